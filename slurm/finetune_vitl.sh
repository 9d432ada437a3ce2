#!/bin/bash
# Finetune open_clip ViT-L/14 (model=vitl14_clip) with ZeRO-2 on one node, then export
# run_dir/export/model.safetensors. parallel=fsdp2 or parallel=ddp select the other backends.
#   sbatch slurm/finetune_vitl.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model.pretrained=/weights/vitl.bin
#SBATCH --job-name=finetune-vitl
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=vitl14_clip parallel=zero2 recipe=rsk "$@"
