"""eval: exact faiss kNN, leave-one-out on the test split, for the frozen and the finetuned encoder.

Writes run_dir/eval/metrics.json as {"frozen": {...}, "finetuned": {...}} and prints a table.
"""
from __future__ import annotations

import json
import logging

from pipeline.config import Config
from pipeline.data.transforms import eval_transform
from pipeline.distributed import pick_device, world_from_env
from pipeline.encoders import load_exported
from pipeline.errors import UserError
from pipeline.inference import embed_split, load_embeddings, save_embeddings
from pipeline.metrics import retrieval_metrics
from pipeline.run_dir import RunDir, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir) -> None:
    split = cfg.eval.split
    device = pick_device(cfg.device, world_from_env())
    splits = json.loads((rd.shards / "summary.json").read_text())["splits"]
    if split not in splits:
        raise UserError(f"eval.split={split} is not in {rd.shards} (splits: {', '.join(splits)})")
    total = splits[split]["images"]
    finetuned = embed_split(load_exported(rd.export).to(device), rd.shards / split, eval_transform(cfg.model),
                            cfg.eval.batch_size, device, total=total, desc=f"embed {split} (finetuned)")
    save_embeddings(rd.embeddings("finetuned") / f"{split}.npz", finetuned)
    results = {}
    for name, data in (("frozen", load_embeddings(rd.embeddings("frozen") / f"{split}.npz")), ("finetuned", finetuned)):
        results[name] = retrieval_metrics(data["embeddings"], data["labels"], ks=tuple(cfg.eval.ks), nmi=cfg.eval.nmi)
    write_json(rd.eval / "metrics.json", results)
    log.info("metrics on %s (%s):\n%s", split, rd.eval / "metrics.json", table(results))


def table(results: dict[str, dict]) -> str:
    keys = [k for k in next(iter(results.values())) if not k.startswith("num_")]
    lines = [f"{'model':<10}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"{name:<10}" + "".join(f"{m[k]:>12.4f}" for k in keys) for name, m in results.items()]
    return "\n".join(lines)
