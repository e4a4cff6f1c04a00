# Sourced by the task folders' cmd/*.sh scripts: run a module with the project's Python
# (.venv if `make setup` made one), from any folder. Usage: run_module <module> <args...>
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
run_module() {
  local module="$1"; shift
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m "$module" "$@"
}
