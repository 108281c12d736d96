#!/usr/bin/env bash
# Create .venv and install scorecam_explorer with the given extras (e.g. "app" or "test").
# Versions are held by constraints.txt so that every machine gets the same environment.
#
# Nothing is installed when nothing changed: a stamp per extra records a hash of
# pyproject.toml and constraints.txt (their contents, not their dates: a checkout or an edit
# that is undone changes nothing). The "test" extra includes everything "app" needs, so after
# `make test`, `make app` installs nothing either.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-app}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$EXTRAS"

fingerprint() {
    cat pyproject.toml constraints.txt | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}
WANT="$(fingerprint)"

# Is an install with these extras (or with extras that include them) up to date?
up_to_date() {
    local extra stamp
    for extra in "$@"; do
        stamp="$VENV/.installed-$extra"
        [ -f "$stamp" ] || continue
        if [ "$(cat "$stamp")" = "$WANT" ]; then
            return 0
        fi
        # a stamp of the earlier kind (empty, dated): valid if newer than both files
        if [ ! -s "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
            echo "$WANT" > "$stamp"
            return 0
        fi
    done
    return 1
}

case "$EXTRAS" in
    app) COVERING="app test" ;;  # the test extra includes voila and ipykernel
    *) COVERING="$EXTRAS" ;;
esac

if [ -x "$VENV/bin/python" ] && up_to_date $COVERING; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
if [ "$EXTRAS" != "app" ] || "$VENV/bin/python" -c "import voila" 2>/dev/null; then
    # the notebooks and the web app run on this environment's kernel
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (scorecam_explorer)" >/dev/null
fi
echo "$WANT" > "$STAMP"
