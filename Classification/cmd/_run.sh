# Sourced by the cmd/*.sh scripts: run a Classification module with the project's Python,
# from any folder. Usage: run_module <module> <args...>
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CONFIGS="$ROOT/Classification/configs"
run_module() {
  local module="$1"; shift
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m "$module" "$@"
}
