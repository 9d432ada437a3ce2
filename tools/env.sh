#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating or updating it first.
#   bash tools/env.sh python pipeline/run.py stage=all run_dir=runs/demo
# The environment lives in .venv (override with VENV=...). It is rebuilt when pyproject.toml or
# constraints.txt change, so a fresh clone needs nothing but Python >= 3.10 and pip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "[env] setting up $venv (first run: about 2 minutes)" >&2
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$root[dev]" >&2
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
