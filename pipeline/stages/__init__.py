"""The pipeline's stages, each `run(cfg, ctx)` (ctx: what the runner resolved once, pipeline/run_context.py): a short recipe over the `pipeline` library."""
