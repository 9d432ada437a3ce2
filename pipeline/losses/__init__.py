"""Training losses for finetuning retrieval encoders."""

from pipeline.config.schema import LOSSES as NAMES
from pipeline.losses.build import build_loss
from pipeline.losses.recall_at_k import RecallAtK, recall_at_k_loss
from pipeline.losses.seeding import set_step
from pipeline.losses.simix import RecallAtKSiMix, simix, simix_pairs

__all__ = ["NAMES", "RecallAtK", "RecallAtKSiMix", "build_loss", "recall_at_k_loss", "set_step", "simix",
           "simix_pairs"]
