"""Where each artifact lives in a run directory, and the stage completion markers.

A marker `stages/<stage>.json` is written last, holding the fingerprint of the settings the stage
was run with; a stage counts as complete only while its marker matches the current settings.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    shards = property(lambda self: self.root / "shards")
    checkpoints = property(lambda self: self.root / "checkpoints")
    export = property(lambda self: self.root / "export")
    eval = property(lambda self: self.root / "eval")
    logs = property(lambda self: self.root / "logs")

    def splits(self) -> dict[str, dict]:
        """shards/summary.json's splits (name -> images, classes, shards, ...), as the shard stage wrote them."""
        return json.loads((self.shards / "summary.json").read_text())["splits"]

    def embeddings(self, model: str) -> Path:
        return self.root / "embeddings" / model

    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def _read_marker(self, stage: str) -> dict:
        path = self.marker(stage)
        return json.loads(path.read_text()) if path.is_file() else {}

    def is_complete(self, stage: str, fingerprint: dict) -> bool:
        return self._read_marker(stage).get("fingerprint") == fingerprint

    def run_id(self, stage: str) -> str | None:
        """Identifies one completed run of a stage, so the stages after it know when it was redone."""
        return self._read_marker(stage).get("run_id")

    def mark_complete(self, stage: str, fingerprint: dict, run_id: str) -> None:
        write_json(self.marker(stage), {"fingerprint": fingerprint, "run_id": run_id,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def clear_marker(self, stage: str) -> None:
        self.marker(stage).unlink(missing_ok=True)


def names_run_checkpoint(spec: str) -> bool:
    """latest, best or step_<N>: a checkpoint of this run (run_dir/checkpoints), not a folder from elsewhere."""
    return spec in ("latest", "best") or re.fullmatch(r"step_\d+", spec) is not None


def write_json(path: Path, data) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written temporary folder into place."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
