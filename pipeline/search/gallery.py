"""The gallery of stage=index: which model embeds it, which shards it is, and its embeddings.

The model is run_dir/export (index.checkpoint unset) or a checkpoint (latest | best | step_<N> |
a folder), through pipeline/eval/sources.py like every other stage's. Its fingerprint is a hash of its weights and architecture: the index records it, and a
Searcher refuses to query an index with a model whose fingerprint differs. The gallery is a split of
the run's shards (index.split) or a split folder of shards made elsewhere (index.gallery). Each item
keeps its key, label and source path (the `path` the converter recorded in the sample's json; empty
for datasets made in memory, as digits). Embedding goes through pipeline.eval.inference.embed_split with
a parts folder, so every rank takes its share of the shards and a killed run resumes without
re-embedding the shards already finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.errors import UserError
from pipeline.eval import sources as models
from pipeline.eval.inference import embed_split
from pipeline.models.encoders import architecture, preprocessing
from pipeline.parallel import distributed
from pipeline.run_dir import RunDir, write_json

log = logging.getLogger(__name__)


def model_source(cfg: Config, rd: RunDir) -> models.Source:
    """The model that embeds the gallery (collective: rank 0 resolves it). The index records it, and the
    Searcher reloads it from that record; paths inside the run directory are kept relative to it."""
    spec = cfg.index.checkpoint or models.FINETUNED
    return distributed.on_main(lambda: models.resolve(spec, cfg, rd, "index.checkpoint"))



def fingerprint(model: nn.Module, model_cfg: ModelConfig) -> str:
    """sha256 of the architecture and every weight's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(architecture(model_cfg), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def preprocessing_of(model_cfg: ModelConfig, resize: int | None) -> dict:
    """The eval view, as a user outside this project reproduces it (see docs/search.md)."""
    mean, std = preprocessing(model_cfg)
    return {"resize": resize or model_cfg.image_size, "crop": model_cfg.image_size, "interpolation": "bilinear",
            "mean": mean, "std": std, "input": "RGB, float32 in [0, 1] after the crop, then (x - mean) / std, NCHW"}


def folder_of(cfg: Config, rd: RunDir) -> Path:
    folder = Path(cfg.index.gallery).expanduser() if cfg.index.gallery else rd.shards / cfg.index.split
    if not (folder / "index.json").is_file():
        where = "index.gallery" if cfg.index.gallery else f"index.split={cfg.index.split}"
        raise UserError(f"{where}: {folder} is not a split folder of shards (no index.json); "
                        f"give a split of {rd.shards} or a folder made by stage=shard")
    return folder.resolve()


def items(folder: Path) -> dict[str, np.ndarray]:
    """key, label and source path of every item, in the shards' order (the embeddings' order)."""
    index = ShardIndex.load(folder)
    paths: dict[str, str] = {}
    for name in index.shards:  # the json members only: a header walk, the images are not read
        with tarfile.open(folder / name) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    paths[info.name.rsplit(".", 1)[0]] = str(json.loads(tar.extractfile(info).read() or b"{}").get("path", ""))
    return {"keys": np.array(index.keys), "labels": index.labels.copy(),
            "paths": np.array([paths.get(k, "") for k in index.keys])}


def parts_folder(out: Path, tag: dict) -> Path:
    """index.parts/: the finished shards' embeddings, kept while they were made with `tag` (same model,
    gallery and preprocessing), emptied otherwise. Rank 0 decides; every rank gets the same folder."""
    parts = out.with_name(out.name + ".parts")

    def check():
        saved = parts / "tag.json"
        if parts.exists() and (not saved.is_file() or json.loads(saved.read_text()) != json.loads(json.dumps(tag))):
            shutil.rmtree(parts)
        if parts.exists():
            log.info("resuming: reusing the embedded shards in %s", parts)
        else:
            write_json(saved, tag)
    distributed.on_main(check)
    return parts


def embed_gallery(model: nn.Module, model_cfg: ModelConfig, folder: Path, resize: int | None, batch_size: int,
                  device: torch.device, parts: Path, workers: int = 0) -> np.ndarray:
    """(n, d) float32 embeddings of the gallery, on every rank; finished shards saved in `parts`."""
    data = embed_split(model.to(device), folder, eval_transform(model_cfg, resize), batch_size, device,
                       desc="embed gallery", workers=workers, parts=parts)
    return data["embeddings"].astype(np.float32, copy=False)
