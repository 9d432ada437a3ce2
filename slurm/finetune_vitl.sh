#!/bin/bash
# Finetune open_clip ViT-L/14 (model=vitl14_clip) with ZeRO-2 on one node, then export
# run_dir/export/model.safetensors. parallel=fsdp2 or parallel=ddp select the other backends.
#   sbatch slurm/finetune_vitl.sh run_dir=runs/vitl-cub data=cub data.root=/data/CUB_200_2011 model.pretrained=/weights/vitl.bin
# Plan it first, on any CPU (docs/plan.md; about a minute), for these settings with recipe=rsk data=sop:
#   python pipeline/run.py stage=plan run_dir=runs/plan-vitl recipe=rsk data=sop model=vitl14_clip parallel=zero2 plan.nodes=1 plan.gpus_per_node=8 plan.gpu=H100-80GB
#   answer (8 H100-80GB, global batch 4000, chunk 50, fp32 with TF32 as the recipe trains): fits, 5.6 of 79.1 GiB
#   per GPU; largest chunk 500, the whole share (31.3 GiB); epoch 34 s (14 steps of 2.46 s at MFU 0.3 of TF32's
#   494.5 TFLOP/s), 0.08 GPU-hours; SOP's 55 epochs about 32 min, plus 11 validations on its 60k test images.
#   With train.tf32=false (IEEE fp32, 67 TFLOP/s): 18.1 s a step, 3.9 h; train.precision=bf16: 1.24 s a step.
# On GPUs it runs device=cuda (slurm/launch.sh): a node where torch sees no GPU stops the job in one line.
# Preemption lead 300 s: the longest of a step (2.5 s; 18 s in IEEE fp32) and a validation (about a minute),
# plus a checkpoint of 3.7 GB (0.30 B parameters x 12 B: fp32 weights and Adam's two moments).
#SBATCH --job-name=finetune-vitl
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=vitl14_clip parallel=zero2 recipe=rsk "$@"
