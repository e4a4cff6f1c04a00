"""Repository layout rules that keep the method in one place."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_FOLDERS = {"Classification", "Detection", "Segmentation"}


def test_no_module_in_afan_imports_a_task_folder():
    for path in (ROOT / "afan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in TASK_FOLDERS, f"{path.name} imports {name}"


def test_skeleton_is_in_place():
    for name in ("README.md", "LICENSE", "requirements.txt", "pyproject.toml", ".gitignore", ".ci/run"):
        assert (ROOT / name).is_file(), name
    for folder in ("Classification", "Detection", "Segmentation", "Figs", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert "advertorch" not in (ROOT / "requirements.txt").read_text()
