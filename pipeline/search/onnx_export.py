"""export.onnx=true: the encoder as export/model.onnx, for users without this project or PyTorch.

Input `images`: float32 (batch, 3, S, S), the eval view (see `preprocessing` in export/config.json:
resize the shorter side, centre-crop S, scale to [0, 1], subtract mean, divide by std); output
`embeddings`: float32 (batch, D), L2-normalised. The batch axis is dynamic. The file is checked
before it is kept: onnxruntime on the CPU against torch on a random batch of another size than the
traced one, max abs difference of the L2-normalised embeddings <= TOLERANCE.

TorchScript-based export (dynamo=False): the dynamo exporter needs onnxscript, one more dependency,
and the three families' ViTs trace cleanly (no data-dependent control flow at a fixed image size).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
OPSET = 17


def export_onnx(model: nn.Module, model_cfg: ModelConfig, path: Path) -> None:
    """Trace `model` (eval mode, on the CPU) into `path` with a dynamic batch axis."""
    model = model.eval().cpu()
    dummy = torch.randn(2, 3, model_cfg.image_size, model_cfg.image_size)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=["images"],
                          output_names=["embeddings"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})


def max_difference(model: nn.Module, path: Path, image_size: int, batch: int = 3, seed: int = 0) -> float:
    """Max abs difference between torch's and onnxruntime's L2-normalised embeddings of a random batch."""
    import onnxruntime

    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().cpu()(images).float(), dim=-1).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": images.numpy()})[0]
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    return float(np.abs(got - expected).max())


def write(model: nn.Module, model_cfg: ModelConfig, folder: Path, resize: int | None) -> float:
    """folder/model.onnx, checked against torch, and the preprocessing added to folder/config.json."""
    from pipeline.search.gallery import preprocessing_of

    path = folder / "model.onnx"
    export_onnx(model, model_cfg, path)
    diff = max_difference(model, path, model_cfg.image_size)
    if not diff <= TOLERANCE:
        path.unlink()
        raise UserError(f"the ONNX export differs from torch by {diff:.2e} (> {TOLERANCE:g}) on a random batch; "
                        f"export without export.onnx=true, or report the model (model.family, model.arch)")
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"] = preprocessing_of(model_cfg, resize)
    config["onnx"] = {"file": "model.onnx", "input": "images", "output": "embeddings", "opset": OPSET,
                      "max_abs_diff_vs_torch": diff}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return diff
