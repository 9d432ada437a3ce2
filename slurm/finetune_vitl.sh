#!/bin/bash
# Finetune open_clip ViT-L/14 (model=vitl14_clip) with ZeRO-2 on one node, then export
# run_dir/export/model.safetensors. parallel=fsdp2 or parallel=ddp select the other backends.
#   sbatch slurm/finetune_vitl.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model.pretrained=/weights/vitl.bin
# Plan it first, on any CPU (docs/plan.md; about a minute), for these settings with recipe=rsk data=sop:
#   python pipeline/run.py stage=plan run_dir=runs/plan-vitl recipe=rsk data=sop model=vitl14_clip parallel=zero2 plan.nodes=1 plan.gpus_per_node=8 plan.gpu=H100-80GB
#   answer (8 H100-80GB, global batch 4000, chunk 50, fp32 as the recipe trains): fits, 5.6 of 79.1 GiB per
#   GPU; largest chunk 500, the whole share (31.3 GiB); epoch 17 s (14 steps of 1.24 s at MFU 0.3), 0.04 GPU-hours
#SBATCH --job-name=finetune-vitl
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=vitl14_clip parallel=zero2 recipe=rsk "$@"
