"""shard: a dataset on disk -> webdataset tars per split + index + summary.json.

The converter gives the dataset's own splits; data.val_classes then holds whole training classes
out as `val` (pipeline/data/val_split.py), the same way for every dataset."""
from __future__ import annotations

import logging
from dataclasses import asdict

from pipeline.config import Config
from pipeline.data.converters import LeftOut, convert
from pipeline.data.shards import write_split
from pipeline.data.val_split import hold_out_classes
from pipeline.run_context import RunContext
from pipeline.run_dir import fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)

NAMED = 100  # names kept in summary.json per kind of thing left out (the count is always exact)
LEFT_OUT = {"empty_classes": "class folder(s) or label(s) with no image (not counted as classes)",
            "unreadable": "folder(s) that could not be read", "ignored_files": "file(s) that are not images",
            "missing_files": "listed file(s) that do not exist"}


def report_left_out(left_out: LeftOut | None) -> dict:
    """One warning line per kind of thing the converter left out, naming them; summary.json's entry."""
    found = {kind: names for kind, names in asdict(left_out or LeftOut()).items() if names}
    for kind, names in found.items():
        more = f" ... and {len(names) - 10} more (shards/summary.json)" if len(names) > 10 else ""
        log.warning("shard: left out %d %s: %s%s", len(names), LEFT_OUT[kind], ", ".join(names[:10]), more)
    return {kind: {"count": len(names), "names": names[:NAMED]} for kind, names in found.items()}


def run(cfg: Config, ctx: RunContext) -> None:
    rd = ctx.run
    converted = convert(cfg.data, cfg.data.seed)
    left_out = report_left_out(getattr(converted, "left_out", None))
    splits = hold_out_classes(converted, cfg.data.val_classes, cfg.data.seed)
    tmp = fresh_dir(rd.shards.with_name("shards.tmp"))
    summary = {}
    for split, records in splits.items():
        summary[split] = write_split(records, tmp / split, split, cfg.data.image_size, cfg.data.image_format,
                                     cfg.data.shard_max_count, cfg.data.shard_max_size, cfg.data.shard_workers)
        log.info("shard %s: %d images, %d classes, %d shards, %d skipped", split, summary[split]["images"],
                 summary[split]["classes"], summary[split]["shards"], summary[split]["skipped"])
    write_json(tmp / "summary.json", {"dataset": cfg.data.name, "splits": summary, "left_out": left_out})
    replace_dir(tmp, rd.shards)
