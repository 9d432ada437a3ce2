"""Evaluation: inference over shards, retrieval metrics (faiss), retrievals, diagnostics, plots, the report.

May import data, tracking, parallel, models, losses, config and the foundation; never the training loop."""
