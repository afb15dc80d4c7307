# Sourced by the other scripts: create .venv on first use (torch pinned to the CPU wheel), then
# activate it. Re-running is cheap: it only installs when requirements changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ASYNC_CKPT_VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "setting up $VENV (first run only)..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # Pin torch exactly first: a looser requirement would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
