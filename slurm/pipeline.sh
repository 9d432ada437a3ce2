#!/bin/bash
# Submit the whole pipeline as three jobs, each starting only when the one before it has succeeded:
# embed.sh (shards the data first) -> finetune_vitl.sh (or finetune_vitg.sh: FINETUNE=vitg; it exports the
# weights) -> eval.sh. Prints the job ids. key=value arguments go to every stage, arguments starting
# with '-' to every sbatch:
#   bash slurm/pipeline.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model.pretrained=/weights/vitl.bin
#   FINETUNE=vitg bash slurm/pipeline.sh --partition=gpu --account=me run_dir=runs/vitg-sop data=sop ...
# A relative run_dir is relative to the repository (the jobs run there); the jobs' output goes to
# logs/slurm-<job name>-<job id>.out in the repository.
set -euo pipefail
export PIPELINE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${FINETUNE:=vitl}" in
    vitl) model=vitl14_clip ;;
    vitg) model=vitg14_clip ;;
    *) echo "FINETUNE=$FINETUNE: use FINETUNE=vitl or FINETUNE=vitg" >&2; exit 2 ;;
esac
sbatch_args=() stage_args=("model=$model" recipe=rsk)  # embed and eval: the finetune job's preset and recipe
for arg in "$@"; do
    if [[ $arg == -* ]]; then sbatch_args+=("$arg"); else stage_args+=("$arg"); fi
done

submit() {  # submit SCRIPT [sbatch options...] -> its job id; a failed dependency cancels the job
    local script=$1; shift
    sbatch --parsable --kill-on-invalid-dep=yes --output="$PIPELINE_REPO/logs/slurm-%x-%j.out" "${sbatch_args[@]}" "$@" \
        "$PIPELINE_REPO/slurm/$script" \
        "${stage_args[@]}" | cut -d';' -f1
}
embed=$(submit embed.sh)
finetune=$(submit "finetune_$FINETUNE.sh" --dependency="afterok:$embed")
eval=$(submit eval.sh --dependency="afterok:$finetune")
echo "embed $embed"
echo "finetune $finetune"
echo "eval $eval"
