"""Query images against a run's index (stage=search, stage=serve, and Python):

    from pipeline.search import Searcher
    searcher = Searcher("runs/demo")                       # run_dir/index, with the model that built it
    results = searcher.search(["query.jpg"], k=5)          # per image: [{key, label, class, path, score, id}, ...]
    Searcher("runs/demo", rerank=Rerank("aqe"))            # re-ranked (pipeline/eval/rerank.py; "dba": an index
                                                           # built with index.dba=true)

The model is reloaded from where the index says it came from (the export, or a checkpoint) and its
fingerprint compared with the index's: an index built with other weights is refused, in one line.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.transforms import eval_transform
from pipeline.errors import UserError
from pipeline.eval import sources as models
from pipeline.eval.rerank import Rerank
from pipeline.search import gallery
from pipeline.search.faiss_index import VectorIndex

ImageLike = Union[str, Path, bytes, Image.Image]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class TooLarge(UserError):
    """An image with more pixels than allowed (found from its header, before decoding)."""


def open_image(source: ImageLike, max_pixels: float | None = None) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image. The size is read from the header and checked
    against max_pixels before any pixel is decoded (a decompression bomb never expands)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "the request body" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"{name}: {e}") from None
    except (UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{name} is not an image PIL can read ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{name} cannot be read: {e}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise TooLarge(f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                       f"at most {max_pixels / 1e6:g} are accepted")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{name} is a broken image: {e}") from None


def image_files(spec) -> list[Path]:
    """search.images: one file, a folder (its images, sorted), or a list of either."""
    if spec is None or spec == [] or spec == "":
        raise UserError("search.images is not set: give an image file, a folder of images or a list [a.jpg,b.jpg]")
    files = []
    for entry in ([spec] if isinstance(spec, (str, Path)) else list(spec)):
        path = Path(entry).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"search.images: {path} does not exist")
    if not files:
        raise UserError(f"search.images={spec} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return files


def class_names(shards: Path) -> dict[int, str]:
    """label -> the dataset's name for it (an image folder's folder names), as the gallery's shard index
    holds them (pipeline/data/shards.py); empty where the dataset has none or the shards are elsewhere."""
    try:
        return {int(k): v for k, v in json.loads((shards / "index.json").read_text()).get("class_names", {}).items()}
    except (OSError, ValueError):
        return {}


class Searcher:
    """A run's index with the model that built it. `search` is thread-safe (torch and faiss only read)."""

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 64,
                 rerank: Rerank | str = "none"):
        folder = Path(run_dir) / "index"
        if not (folder / "meta.json").is_file():
            raise UserError(f"{folder} holds no index; run stage=index run_dir={run_dir} first")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.gallery = Path(run_dir) / self.meta["gallery"]  # the gallery's shards (absolute if made elsewhere)
        loaded = models.load(models.Source.from_record(self.meta["source"]), Path(run_dir))
        self.model, model_cfg = loaded.model, loaded.config
        found = gallery.fingerprint(self.model, model_cfg)
        if found != self.meta["fingerprint"]:
            where = Path(run_dir) / (self.meta["source"].get("export") or self.meta["source"]["checkpoint"])
            raise UserError(f"{folder} was built with model fingerprint {self.meta['fingerprint']} but {where} now "
                            f"holds model {found}; rebuild it with stage=index force=true run_dir={run_dir}")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.transform = eval_transform(model_cfg, self.meta["preprocessing"]["resize"])
        self.index = VectorIndex.load(folder)
        with np.load(folder / "items.npz") as items:
            self.keys, self.labels, self.paths = items["keys"], items["labels"], items["paths"]
        self.class_names = class_names(self.gallery)
        self.batch_size = batch_size
        self.rerank = Rerank(rerank) if isinstance(rerank, str) else rerank
        if self.rerank.method == "dba" and not self.meta.get("dba"):
            raise UserError(f"search.rerank=dba searches an index of augmented vectors, and {folder} was built without; "
                            f"rebuild it with stage=index index.dba=true force=true run_dir={run_dir}")
        # the gallery's float vectors (augmented where the index is), read row by row as a re-ranking needs them
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")

    @torch.no_grad()
    def embed(self, images: Iterable[ImageLike]) -> np.ndarray:
        """(n, d) L2-normalised float32 embeddings, as the index's gallery was embedded."""
        tensors = [self.transform(open_image(image)) for image in images]
        out = [self.model(torch.stack(tensors[i:i + self.batch_size]).to(self.device)).float().cpu().numpy()
               for i in range(0, len(tensors), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.meta["embed_dim"]), np.float32)

    def search(self, images: ImageLike | Iterable[ImageLike], k: int = 5) -> list[list[dict]]:
        """Per query image, its k nearest gallery items, best first: key, label, class, path, score, id."""
        single = isinstance(images, (str, Path, bytes, Image.Image))
        return self.search_embeddings(self.embed([images] if single else list(images)), k)

    def class_name(self, label: int) -> str:
        """The gallery's name for a class, else `class <label>` (as ShardIndex.class_name)."""
        return self.class_names.get(int(label), f"class {label}")

    def search_embeddings(self, embeddings: np.ndarray, k: int) -> list[list[dict]]:
        """score: the cosine, or the re-ranking's (pipeline/eval/rerank.py: Rerank.search)."""
        scores, ids = self.rerank.search(self.index.search, self.vectors, embeddings, min(k, len(self.vectors)))
        return [[{"key": str(self.keys[i]), "label": int(self.labels[i]), "class": self.class_name(self.labels[i]),
                  "path": str(self.paths[i]), "score": float(s), "id": int(i)}
                 for s, i in zip(row_scores, row_ids) if i >= 0]
                for row_scores, row_ids in zip(scores, ids)]
