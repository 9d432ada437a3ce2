"""The pipeline's stages, each `run(cfg, run_dir)`: a short recipe over the `pipeline` library."""
