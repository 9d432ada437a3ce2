"""The public home of the retrieval metrics (a contract: `pipeline.metrics.retrieval_metrics`).

They live in pipeline/eval/metrics.py; this name stays for users and their scripts."""
from pipeline.eval.metrics import retrieval_metrics

__all__ = ["retrieval_metrics"]
