"""shard: a dataset on disk -> webdataset tars per split + index + summary.json.

The converter gives the dataset's own splits; data.val_classes then holds whole training classes
out as `val` (pipeline/data/val_split.py), the same way for every dataset."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.data.converters import convert
from pipeline.data.shards import write_split
from pipeline.data.val_split import hold_out_classes
from pipeline.run_dir import RunDir, fresh_dir, replace_dir, write_json

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir) -> None:
    splits = hold_out_classes(convert(cfg.data, cfg.data.seed), cfg.data.val_classes, cfg.data.seed)
    tmp = fresh_dir(rd.shards.with_name("shards.tmp"))
    summary = {}
    for split, records in splits.items():
        summary[split] = write_split(records, tmp / split, split, cfg.data.image_size, cfg.data.image_format,
                                     cfg.data.shard_max_count, cfg.data.shard_max_size, cfg.data.shard_workers)
        log.info("shard %s: %d images, %d classes, %d shards, %d skipped", split, summary[split]["images"],
                 summary[split]["classes"], summary[split]["shards"], summary[split]["skipped"])
    write_json(tmp / "summary.json", {"dataset": cfg.data.name, "splits": summary})
    replace_dir(tmp, rd.shards)
