"""The exported model loads with the upstream libraries alone: the "Using the exported model"
snippets, extracted from docs/exported-model.md and run as they stand in a subprocess where this project's
modules (and DeepSpeed, accelerate) cannot be imported, give the embeddings of `load_exported`."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, SMALL
from PIL import Image

from pipeline.config import ModelConfig, load_config
from pipeline.data.transforms import eval_transform
from pipeline.models.encoders import build_encoder, export, load_exported

TINY_VIT = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
            "model.embed_dim=16", "model.grad_checkpointing=false"]
# What the snippets read, relative to their working directory (the paths written in the README).
FOLDER, IMAGES = Path("runs/demo/export"), {"cat.jpg": (45, 38), "dog.jpg": (30, 52)}  # (height, width)
BLOCKED = ("pipeline", "stages", "deepspeed", "accelerate")

# case -> (family, overrides of TINY_VIT): each family, with the head and size variants the snippets must handle.
CASES = {
    "open_clip": ("open_clip", ["model=vitl14_clip"]),
    "timm_tiny": ("timm", ["model=tiny"]),  # the preset's own mean/std
    "timm_dinov2_no_head_norm": ("timm", ["model=dinov2_vitl14", "model.head_norm=false"]),
    "hf_dinov2_no_head": ("transformers", ["model=dinov2_vitl14_hf", "model.embed_dim=0"]),
    "hf_clip_pretrained_48px": ("transformers", ["model=clip_vitl14_hf"]),  # weights at 48 px, used at 32 px
    "quickstart_stage_export": ("timm", None),  # stage=export of a finetuned digits run (conftest's digits_run)
    # The towers of issue 37: open_clip's timm towers (ViT with a MAP head; EVA with RoPE, a MAP head and PE's
    # projection; EVA-02's class token), timm's DINOv3 (class token, registers left out) and AIMv2, and
    # transformers' DINOv3 (registers, from a folder), SigLIP 2 (NaFlex; its position table at 48 px, used at
    # 32 px) and AIMv2 (attention-pooling head).
    "open_clip_siglip2": ("open_clip", ["model=siglip2_vitl16_256"]),
    "open_clip_pecore": ("open_clip", ["model=pecore_l14_336"]),
    "open_clip_eva02_no_head_norm": ("open_clip", ["model=eva02_l14", "model.head_norm=false"]),
    "timm_dinov3": ("timm", ["model=dinov3_vitl16"]),
    "timm_aimv2_no_head": ("timm", ["model=aimv2_l14", "model.embed_dim=0"]),
    "hf_dinov3_registers": ("transformers", ["model=dinov3_vitl16_hf"]),
    "hf_siglip2_pretrained_48px": ("transformers", ["model.family=transformers", "model.arch=Siglip2VisionModel"]),
    "hf_aimv2": ("transformers", ["model.family=transformers", "model.arch=Aimv2VisionModel"]),
}
HF_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
           "patch_size": 8}
# Cases that start from a from_pretrained folder, as a user with real weights has one (its config decides
# what the model keys do not: register tokens, the size of the position table).
HF_FOLDERS = {
    "hf_clip_pretrained_48px": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **HF_TINY, image_size=48)),
    "hf_dinov3_registers": lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **HF_TINY, image_size=32, num_register_tokens=4)),
    "hf_siglip2_pretrained_48px": lambda: transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
        **HF_TINY, num_patches=36)),
}


def readme_snippets() -> dict[str, str]:
    """The section's Python blocks: the common one first, then one per family (named by its import)."""
    section = (REPO / "docs" / "exported-model.md").read_text().split("\n## ONNX")[0]  # the ONNX recipe: test_search
    common, *families = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {"common": common, **{re.match(r"import (\w+)", block).group(1): block for block in families}}


def trained_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A model of the config whose every parameter matters (as after finetuning: LayerNorms not at 1/0)."""
    model = build_encoder(cfg, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def write_export(case: str, case_dir: Path, seed: int, digits_run: Path) -> ModelConfig:
    """The case's export under case_dir/FOLDER; returns the model config it was trained with."""
    overrides = CASES[case][1]
    if overrides is None:
        shutil.copytree(digits_run / "export", case_dir / FOLDER)
        return load_config(SMALL).model
    if case in HF_FOLDERS:
        HF_FOLDERS[case]().save_pretrained(case_dir / "upstream_hf")
        overrides = [*overrides, f"model.pretrained={case_dir / 'upstream_hf'}"]
    cfg = load_config([*TINY_VIT, *overrides]).model  # presets apply first; the case's overrides win
    export(trained_model(cfg, seed), cfg, case_dir / FOLDER)
    return cfg


HARNESS = """
import os, runpy, sys, traceback
sys.modules.update(dict.fromkeys({blocked!r}))  # importing any of these now fails
import torch
torch.set_num_threads(1)
for case in sys.argv[1:]:
    os.chdir(case)
    try:
        torch.save(runpy.run_path("snippet.py")["embeddings"], "embeddings.pt")
    except BaseException:
        open("error.txt", "w").write(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_run) -> dict[str, tuple[Path, torch.Tensor | None]]:
    """Per case: its folder (the snippet's working directory, after the snippet ran) and the pipeline's
    embeddings of the same images (`load_exported` + the eval stage's transform of the training config).
    All snippets run in one subprocess (one import of torch and the libraries)."""
    snippets, runs = readme_snippets(), {}
    for seed, (case, (family, _)) in enumerate(CASES.items()):
        case_dir = tmp_path_factory.mktemp(case)
        cfg = write_export(case, case_dir, seed, digits_run)
        rng = np.random.default_rng(seed)
        for name, shape in IMAGES.items():
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(case_dir / name)
        (case_dir / "snippet.py").write_text(snippets["common"] + "\n" + snippets[family])
        transform = eval_transform(cfg)
        images = torch.stack([transform(Image.open(case_dir / name).convert("RGB")) for name in IMAGES])
        with torch.no_grad():
            runs[case] = case_dir, load_exported(case_dir / FOLDER)(images)
    probe = tmp_path_factory.mktemp("imports_the_project")  # a snippet that needs the project must fail
    (probe / "snippet.py").write_text("from pipeline.models.encoders import load_exported\n")
    runs["imports_the_project"] = probe, None
    subprocess.run([sys.executable, "-c", HARNESS.format(blocked=BLOCKED), *(str(d) for d, _ in runs.values())],
                   check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return runs


def test_readme_has_a_snippet_per_family():
    assert set(readme_snippets()) == {"common", "open_clip", "timm", "transformers"}


@pytest.mark.parametrize("case", CASES)
def test_readme_snippet_gives_the_pipeline_embeddings(runs, case):
    case_dir, expected = runs[case]
    if (case_dir / "error.txt").exists():
        pytest.fail(f"the README's {CASES[case][0]} snippet failed:\n{(case_dir / 'error.txt').read_text()}")
    embeddings = torch.load(case_dir / "embeddings.pt")
    cfg = json.loads((case_dir / FOLDER / "config.json").read_text())
    assert cfg["family"] == CASES[case][0]
    assert (cfg["embed_dim"] == 0) == case.endswith("_no_head")
    assert embeddings.shape == (len(IMAGES), cfg["embed_dim"] or cfg["width"])
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


def test_snippets_cannot_import_the_project(runs):
    """The harness really blocks the project (installed, so importable otherwise): the probe snippet,
    which imports it, failed for that reason."""
    error = (runs["imports_the_project"][0] / "error.txt").read_text()
    assert "No module named 'pipeline.models'; 'pipeline' is not a package" in error  # None in sys.modules
