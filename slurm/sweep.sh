#!/bin/bash
# Submit a sweep as one Slurm job array plus a job that summarises it:
#   bash slurm/sweep.sh --out SWEEP [--throttle N] [--sbatch-option=value ...] GRID... -- key=value...
#   bash slurm/sweep.sh --out runs/losses --throttle 4 --partition=gpu --gpus-per-node=1 \
#       loss=rsk,margin seed=0,1,2 -- data=glyphs train.max_steps=1000
# The grid, the run folders (SWEEP/<run>) and the summary are tools/sweep.py's (see pipeline/sweep/).
# First a job that shards once for the runs that shard the same data (e.g. seeds with data.seed fixed)
# and copies the shards to the others (tools/sweep.py --share-shards); then, after it however it ended
# (a task whose shards are missing shards for itself), one array task per run not yet finished (a
# second call submits neither for finished runs), at most N
# running at once with --throttle N; each is slurm/sweep_task.sh: launch.sh's launcher on one node
# (NPROC_PER_NODE processes; preemption: checkpoint and requeue). The summary job depends on the
# array with afterany, so it runs however the tasks ended and lists the runs that did not finish.
# A run that is running already (its run_dir/.lock held: this sweep resubmitted while its earlier array
# runs) is skipped with a line, here and again when its task starts (docs/faults.md).
# Options starting with - (write them as --option=value) go to every sbatch call (a --time= given there
# overrides the shard job's 4 h, the tasks' (sweep_task.sh) and the summary's 30 min). Prints the job ids.
# Task output: SWEEP/slurm/<array id>_<task>.out; the others': SWEEP/slurm/{shards,summary}-<id>.out.
set -euo pipefail
export PIPELINE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: bash slurm/sweep.sh --out SWEEP [--throttle N] [--sbatch-option=value ...] GRID... -- key=value..."
out="" throttle="" sbatch_args=() grid=() fixed=()
while (($#)); do
    case $1 in
        --out) out=${2:?$usage}; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --throttle) throttle=${2:?$usage}; shift 2 ;;
        --throttle=*) throttle=${1#*=}; shift ;;
        --) shift; fixed=("$@"); break ;;
        -*) sbatch_args+=("$1"); shift ;;
        *) grid+=("$1"); shift ;;
    esac
done
[[ -n $out ]] || { echo "$usage" >&2; exit 2; }
[[ -z $throttle || $throttle =~ ^[1-9][0-9]*$ ]] || { echo "--throttle $throttle: give a number of tasks" >&2; exit 2; }
out=$(realpath -m "$out")

# Checks the grid (one line and status 2 if wrong), saves the plan, lists the runs to do: "0,2,3".
todo=$(python "$PIPELINE_REPO/tools/sweep.py" --out "$out" --plan "${grid[@]}" -- "${fixed[@]}")
mkdir -p "$out/slurm"
after=()
if [[ -n $todo ]]; then
    shards=$(sbatch --parsable --job-name=sweep-shards --output="$out/slurm/shards-%j.out" --time=04:00:00 \
        "${sbatch_args[@]}" \
        --ntasks=1 --wrap="python $(printf %q "$PIPELINE_REPO/tools/sweep.py") --out $(printf %q "$out") --share-shards" \
        | cut -d';' -f1)
    echo "shards $shards"
    array=$(sbatch --parsable --array="$todo${throttle:+%$throttle}" --output="$out/slurm/%A_%a.out" \
        --dependency="afterany:$shards" "${sbatch_args[@]}" "$PIPELINE_REPO/slurm/sweep_task.sh" "$out" | cut -d';' -f1)
    echo "array $array"
    after=(--dependency="afterany:$array")
else
    echo "array none (every run is finished)"
fi
summary=$(sbatch --parsable --job-name=sweep-summary "${after[@]}" --output="$out/slurm/summary-%j.out" \
    --time=00:30:00 "${sbatch_args[@]}" --ntasks=1 \
    --wrap="python $(printf %q "$PIPELINE_REPO/tools/sweep.py") --out $(printf %q "$out") --aggregate" | cut -d';' -f1)
echo "summary $summary"
