#!/usr/bin/env bash
# The slow suite, whole, on a fresh clone (issue 35: run once a round, its time and result recorded in
# BENCHMARKS.md). Usage: bash tools/slow_suite.sh [OUT [PYTEST_ARGS...]]   (OUT: where the record goes, a temp
# folder if omitted; PYTEST_ARGS narrow it, e.g. -k giant, for a check of the script itself)
# Starts the two-node local Slurm cluster as .ci/run does (REQUIRE_SLURM=1: a Slurm test fails instead of
# skipping), then `pytest -q -m slow --durations=0` with FULL_SIZE_LOG, so the full-size steps' figures
# (time, peak memory per rank, update errors) land in OUT/full_size.jsonl. It needs the machine to itself:
# the ViT-g/14 steps need about 17 GiB free, 21 under zero3, and the timings mean nothing under load.
# OUT gets: pytest.log (the durations at its end), full_size.jsonl and its table full_size.md
# (tools/full_size_table.py), costs.md (tools/suite_costs.py), and
# summary.txt (commit, machine, load before and after, wall time, pytest's last line).
set -uo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$(mktemp -d)/slow}")"
shift || true
mkdir -p "$out"
clone="$(mktemp -d)/clone"
# The clone and its venv are about 6 GB: removed at the end (the record is in OUT), or a few runs fill the disk.
trap 'rm -rf "$(dirname "$clone")"' EXIT
git clone -q "$src" "$clone"
cd "$clone"

as_root=(); [[ $EUID -eq 0 ]] || as_root=(sudo -n)
"${as_root[@]}" env NODES=2 bash tools/local_slurm.sh >/dev/null || echo "slow suite: the local Slurm cluster did not start" >&2
bash tools/env.sh true  # the venv, before the clock starts

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
REQUIRE_SLURM=1 FULL_SIZE_LOG="$out/full_size.jsonl" bash tools/env.sh python -m pytest -q -m slow --durations=0 "$@" \
    > "$out/pytest.log" 2>&1
status=$?
wall=$(( $(date +%s) - start ))
bash tools/env.sh python tools/suite_costs.py "$out/pytest.log" > "$out/costs.md" 2>&1
[[ -s "$out/full_size.jsonl" ]] && bash tools/env.sh python tools/full_size_table.py "$out/full_size.jsonl" > "$out/full_size.md"

{
    echo "commit: $(git rev-parse --short HEAD)"
    echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m)"
    echo "load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "pytest -m slow: exit $status, ${wall} s ($(( wall / 60 )) min $(( wall % 60 )) s)"
    grep -E "passed|failed|error" "$out/pytest.log" | tail -1
} | tee "$out/summary.txt"
exit "$status"
