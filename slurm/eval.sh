#!/bin/bash
# Evaluate the frozen and the finetuned encoder (faiss kNN): run_dir/eval/metrics.json and the report.
#   sbatch slurm/eval.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model=vitl14_clip model.pretrained=/weights/vitl.bin
#SBATCH --job-name=eval
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=eval "$@"
