#!/bin/bash
# Finetune open_clip ViT-g/14 (model=vitg14_clip, activation checkpointing on) with ZeRO-3, then export
# run_dir/export/model.safetensors. parallel=fsdp2 selects FSDP2; LAUNCHER=accelerate, accelerate launch.
#   sbatch slurm/finetune_vitg.sh run_dir=runs/vitg-sop data=sop data.root=/data/sop model.pretrained=/weights/vitg.bin
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 slurm/finetune_vitg.sh model=tiny data=digits train.max_steps=20 run_dir=runs/tiny
# (the last: the same job, small, on CPU nodes; a node with fewer CPUs than --cpus-per-task never starts it)
#SBATCH --job-name=finetune-vitg
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=vitg14_clip parallel=zero3 recipe=rsk "$@"
