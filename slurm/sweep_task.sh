#!/bin/bash
# One task of a sweep's job array, submitted by slurm/sweep.sh: the run number $SLURM_ARRAY_TASK_ID of
# the sweep planned in $1, started by launch.sh (like the other jobs: NPROC_PER_NODE processes,
# preemption handled). Resources: these lines, or sbatch options given to slurm/sweep.sh.
#SBATCH --job-name=sweep
#SBATCH --nodes=1 --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"
[[ -n ${SLURM_ARRAY_TASK_ID:-} && -n ${1:-} ]] || { echo "submit it with: bash slurm/sweep.sh --out SWEEP GRID..." >&2; exit 2; }
args_file="$1/slurm/args.${SLURM_JOB_ID}"
status=0
python tools/sweep.py --out "$1" --args "$SLURM_ARRAY_TASK_ID" > "$args_file" || status=$?
# 3: the run is being written by another job (a sweep resubmitted while this run still runs): skipped.
((status == 3)) && { rm -f "$args_file"; exit 0; }
((status == 0)) || { rm -f "$args_file"; exit "$status"; }
mapfile -d '' args < "$args_file"
rm -f "$args_file"
launch "${args[@]}"
