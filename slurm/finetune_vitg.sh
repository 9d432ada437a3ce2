#!/bin/bash
# Finetune open_clip ViT-g/14 (model=vitg14_clip, activation checkpointing on) with ZeRO-3, then export
# run_dir/export/model.safetensors. parallel=fsdp2 selects FSDP2; LAUNCHER=accelerate, accelerate launch.
#   sbatch slurm/finetune_vitg.sh run_dir=runs/vitg-sop data=sop data.root=/data/sop model.pretrained=/weights/vitg.bin
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 slurm/finetune_vitg.sh model=tiny data=digits train.max_steps=20 run_dir=runs/tiny
# (the last: the same job, small, on CPU nodes; a node with fewer CPUs than --cpus-per-task never starts it)
# Plan it first, on any CPU (docs/plan.md; about a minute), for these settings with recipe=rsk data=sop:
#   python pipeline/run.py stage=plan run_dir=runs/plan-vitg recipe=rsk data=sop model=vitg14_clip parallel=zero3 plan.nodes=2 plan.gpus_per_node=8 plan.gpu=H100-80GB
#   answer (2x8 H100-80GB, global batch 4000, chunk 50, fp32 with TF32 as the recipe trains): fits, 7.2 of 79.1
#   GiB per GPU; largest chunk 250, the whole share (25.6 GiB); epoch 70 s (14 steps of 5.02 s at MFU 0.3 of TF32's
#   494.5 TFLOP/s), 0.31 GPU-hours; SOP's 55 epochs about 64 min, plus 11 validations on its 60k test images.
#   On one node (plan.nodes=1, 8 H100-80GB): 8.5 GiB per GPU; largest chunk 500 (49.9 GiB); epoch 117 s
#   (14 x 8.34 s), 55 epochs about 1.8 h. With train.tf32=false (IEEE fp32, 67 TFLOP/s): 31.0 s a step on 2
#   nodes (6.6 h), 60.3 s on one (12.9 h); train.precision=bf16: 2.99 s and 4.27 s.
# On GPUs it runs device=cuda (slurm/launch.sh): a node where torch sees no GPU stops the job in one line.
# Preemption lead 300 s: the longest of a step (5-8 s; 31-60 s in IEEE fp32) and a validation (about a
# minute), plus a checkpoint of 12.2 GB (1.01 B parameters x 12 B: fp32 weights and Adam's two moments).
#SBATCH --job-name=finetune-vitg
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=vitg14_clip parallel=zero3 recipe=rsk "$@"
