#!/bin/bash
# Shard the dataset (if not done yet) and embed it with the frozen encoder, every GPU taking a share.
#   sbatch slurm/embed.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model=vitl14_clip model.pretrained=/weights/vitl.bin
#SBATCH --job-name=embed
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=embed "$@"
