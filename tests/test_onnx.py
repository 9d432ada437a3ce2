"""export.onnx: model.onnx equals torch within 1e-4 (L2-normalised embeddings) for the tiny model and
each family (timm, open_clip, transformers) built small, at two batch sizes (the batch axis is dynamic).
The comparison is made here with onnxruntime, not through the exporter's own check."""
import json

import numpy as np
import onnxruntime
import pytest
import torch

from pipeline.config import load_config
from pipeline.models.encoders import build_encoder, export
from pipeline.search import onnx_export

# as tests/test_encoders.py builds small models of each family (random weights: no hub here)
TINY_VIT = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
            "model.embed_dim=16", "model.grad_checkpointing=false"]


@pytest.mark.parametrize("preset", ["tiny", "dinov2_vitl14", "vitl14_clip", "dinov2_vitl14_hf", "clip_vitl14_hf"])
def test_onnx_matches_torch(tmp_path, preset):
    cfg = load_config([f"model={preset}", *(TINY_VIT if preset != "tiny" else [])]).model
    model = build_encoder(cfg, seed=0).eval()
    export(model, cfg, tmp_path)
    onnx_export.write(model, cfg, tmp_path, resize=40)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        got /= np.linalg.norm(got, axis=1, keepdims=True)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, (preset, batch)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preprocessing"]["resize"] == 40 and config["preprocessing"]["crop"] == cfg.image_size
    assert config["family"] == cfg.family  # still the export's own config


def test_an_export_that_differs_from_torch_is_refused(tmp_path, monkeypatch):
    cfg = load_config([]).model
    model = build_encoder(cfg, seed=0).eval()
    export(model, cfg, tmp_path)
    monkeypatch.setattr(onnx_export, "max_difference", lambda *a, **k: 3e-3)
    with pytest.raises(Exception, match="differs from torch by 3.00e-03"):
        onnx_export.write(model, cfg, tmp_path, None)
    assert not (tmp_path / "model.onnx").exists()
