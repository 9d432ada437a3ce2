"""Training losses for finetuning retrieval encoders."""

from pipeline.losses.recall_at_k import RecallAtK, recall_at_k_loss

__all__ = ["RecallAtK", "recall_at_k_loss"]
