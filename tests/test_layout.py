"""Repository layout rules that keep the method in one place."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_FOLDERS = {"Classification", "Detection", "Segmentation"}


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` -> the top-level packages it imports (relative imports: itself)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        found[path.name] = names
    return found


def test_the_method_imports_only_torch_and_itself():
    """``afan`` is the method: no harness, no task folder, no dependency besides torch."""
    # timm: afan.split reads its do-not-trace list when a timm model was already imported.
    allowed = {"afan", "torch", "timm", "__future__"} | set(sys.stdlib_module_names)
    for module, names in _imported_packages("afan").items():
        assert names <= allowed, f"afan/{module} imports {sorted(names - allowed)}"


def test_the_harness_imports_no_task_folder():
    for module, names in _imported_packages("afan_harness").items():
        assert not names & TASK_FOLDERS, f"afan_harness/{module} imports {sorted(names & TASK_FOLDERS)}"
    assert "afan" in set().union(*_imported_packages("afan_harness").values())  # it runs the method


def test_skeleton_is_in_place():
    for name in ("README.md", "LICENSE", "requirements.txt", "pyproject.toml", ".gitignore", ".ci/run"):
        assert (ROOT / name).is_file(), name
    for folder in ("Classification", "Detection", "Segmentation", "Figs", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert "advertorch" not in (ROOT / "requirements.txt").read_text()


def test_the_task_packages_run_from_any_folder(tmp_path):
    """``pip install -e .`` (``make setup``) installs the three task packages with ``afan``, so
    the resume command a stopped run prints works wherever the user stands."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for module in ("Classification.train", "Segmentation.test"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (module, done.stderr)


def test_docs_cited_by_the_code_are_in_the_repository():
    """Docstrings cite ``docs/method.md items N``; every such item exists there, and every
    Markdown file the code or a README names is a file of this repository (users have no
    other)."""
    import re

    method = (ROOT / "docs/method.md").read_text(encoding="utf-8")
    items = {int(n) for n in re.findall(r"^(\d+)\. \*\*", method, flags=re.M)}
    assert items == set(range(1, 8))
    for path in [*ROOT.glob("*/*.py"), *ROOT.glob("*/*/*.py"), *ROOT.glob("**/README.md")]:
        if ".venv" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        # A name, not the end of a link's path (those point to other projects).
        for cited in re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)\b", text):
            assert any((base / cited).is_file() for base in (ROOT, path.parent)), (path, cited)
        for cited in re.findall(r"method\.md items? ([\d ,and-]+)", text):
            numbers = {int(n) for n in re.findall(r"\d+", cited)}
            assert numbers <= items, (path, cited)
