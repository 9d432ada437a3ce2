#!/bin/bash
# Finetune DINOv3 ViT-7B/16 (model=dinov3_vit7b16: timm vit_7b_patch16_dinov3, 6.7B parameters, activation
# checkpointing on) with FSDP2 on 4 nodes of 8 GPUs, bf16 forward and bf16 gathered weights, then export
# run_dir/export/model.safetensors. parallel=zero3 selects ZeRO-3; LAUNCHER=accelerate, accelerate launch.
#   sbatch slurm/finetune_dinov3_7b.sh run_dir=runs/dinov3-7b-sop data=sop data.root=/data/sop model.pretrained=hub:lvd1689m
# (hub:lvd1689m reads timm/vit_7b_patch16_dinov3.lvd1689m from the Hugging Face cache: fill it once on a
# login node, then HF_HUB_OFFLINE=1; or give Meta's released dinov3_vit7b16_pretrain_lvd1689m-*.pth)
# Plan it first, on any CPU (docs/plan.md), for these settings with recipe=rsk data=sop:
#   python pipeline/run.py stage=plan run_dir=runs/plan-dinov3-7b recipe=rsk data=sop model=dinov3_vit7b16 parallel=fsdp2 train.precision=bf16 parallel.param_dtype=bf16 train.global_batch=4096 train.chunk_size=128 plan.nodes=4 plan.gpus_per_node=8 plan.gpu=H100-80GB
#   answer (4x8 H100-80GB, global batch 4096, chunk 128: the whole share, one chunk per step; bf16): fits,
#   20.2 of 79.1 GiB per GPU; step 7.1 s (5.8 s compute at MFU 0.3 + 1.3 s communication at 400 Gbit/s, not
#   overlapped); epoch 1.7 min (14 steps), 0.9 GPU-hours. With train.chunk_size=32: 35.9 GiB and 9.5 s a step
#   (accumulating 4 chunks keeps the whole fp32 gradient unsharded until the last: 25.9 GiB; and 4x the gathers).
#SBATCH --job-name=finetune-dinov3-7b
#SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300 --requeue --open-mode=append
#SBATCH --output=logs/slurm-%x-%j.out
source "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"  # submit from the repository root
launch stage=export model=dinov3_vit7b16 parallel=fsdp2 recipe=rsk train.precision=bf16 parallel.param_dtype=bf16 train.global_batch=4096 train.chunk_size=128 "$@"
