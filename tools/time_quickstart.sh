#!/usr/bin/env bash
# Time the README's Quick start from a fresh clone: set-up + main job, then the main job alone,
# and print the demo's metrics. Usage: bash tools/time_quickstart.sh [clone dir]
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$(mktemp -d)/clone}"
git clone -q "$src" "$dest"
cd "$dest"
main_job=(bash tools/env.sh python pipeline/run.py stage=all run_dir=runs/demo)

start=$(date +%s)
"${main_job[@]}" > /dev/null 2> first.log
first=$(( $(date +%s) - start ))

rm -rf runs/demo
start=$(date +%s)
"${main_job[@]}" > /dev/null 2> second.log
second=$(( $(date +%s) - start ))

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m), torch threads $(.venv/bin/python -c 'import torch; print(torch.get_num_threads())')"
echo "fresh clone -> set-up + main job: ${first} s"
echo "main job alone (environment ready): ${second} s"
echo "set-up alone (difference): $(( first - second )) s"
grep -A3 "^model" second.log
