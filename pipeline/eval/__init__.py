"""Evaluation: inference over shards, retrieval metrics (faiss), retrievals, diagnostics, plots, the report.

May import data, tracking, dist, models, losses, config and the foundation; never the training loop."""
