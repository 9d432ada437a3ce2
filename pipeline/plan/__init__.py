"""stage=plan: what a run needs on a GPU cluster, found before any GPU is paid for.

The project's own finetune step (build_encoder, the engine, two_pass_step, the loss) runs for two
steps on fake tensors (shapes and storage sizes, no data) with a fake process group of the target
world size, under torch's memory tracker and FLOP counter (simulate.py); estimate.py turns that
into per-GPU memory, the largest chunk that fits and the time of a step and an epoch; report.py
writes run_dir/plan/. See docs/plan.md.
"""
