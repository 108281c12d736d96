#!/usr/bin/env bash
# Create .venv and install scorecam_explorer with the given extras (e.g. "app" or "test").
# Versions are held by constraints.txt so that every machine gets the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-app}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$EXTRAS"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt constraints.txt ]; then
    exit 0
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
if [ "$EXTRAS" != "app" ] || "$VENV/bin/python" -c "import voila" 2>/dev/null; then
    # the notebooks and the web app run on this environment's kernel
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (scorecam_explorer)" >/dev/null
fi
touch "$STAMP"
