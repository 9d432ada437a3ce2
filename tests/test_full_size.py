"""Every large preset at its real size (224 px, random weights), on the CPU: the parameter count equals
the library's own model of that name, the upstream format loads back through model.pretrained, and
images embed; the two-pass step at full size (the L-size presets: one process; ViT-g/14: fsdp2 and
zero3 on 2 processes against one); the giants (DINOv3 ViT-7B and H+, PE-Core bigG) counted on the
meta device. Only the ViT-L/14 forward of one image and the harness on the tiny preset are in the default suite; the rest
is slow (minutes each; the ViT-g/14 steps need about 17 GiB free, 21 under zero3: the machine to themselves).
FULL_SIZE_LOG=path appends each step's figures (times, peak memory per rank, update errors) to that
file as JSON lines."""
import gc
import importlib.util
import json
import os
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import REPO

from pipeline.config import ModelConfig, load_config
from pipeline.parallel import host_memory
from pipeline.models.encoders import build_encoder

# The 2026 foundations at L size (issue 37): DINOv3 (timm, transformers), SigLIP 2, PE-Core, EVA-02, AIMv2.
NEW_L = ("dinov3_vitl16", "dinov3_vitl16_hf", "siglip2_so400m14", "siglip2_vitl16_256", "pecore_l14_336", "eva02_l14",
         "aimv2_l14")
PRESETS = ("vitl14_clip", "dinov2_vitl14", "dinov2_vitl14_hf", "clip_vitl14_hf", "vitg14_clip", "dinov2_vitg14", *NEW_L)
# timm initialises their tower's projection (EVA's and PE's head) at 1e-3 of its scale: at random init it takes
# nearly the whole update (the blocks' are below 1e-2 of it), so the blocks are compared among themselves too.
PROJECTION_TAKES_THE_UPDATE = ("pecore_l14_336", "eva02_l14")
# Too large to build on this machine: their counts on the meta device (no memory), against the library's.
GIANTS = {"dinov3_vit7b16": 6_716_030_976, "dinov3_vith16plus": 840_509_440, "pecore_bigg14_448": 1_882_033_920}
# The released checkpoints' transformers configs (facebook/dinov2-large, openai/clip-vit-large-patch14).
HF_CONFIGS = {"dinov2_vitl14_hf": ("Dinov2Model", "Dinov2Config", dict(hidden_size=1024, num_hidden_layers=24,
                                    num_attention_heads=16, patch_size=14, image_size=518, mlp_ratio=4)),
              "clip_vitl14_hf": ("CLIPVisionModel", "CLIPVisionConfig", dict(hidden_size=1024, num_hidden_layers=24,
                                 num_attention_heads=16, intermediate_size=4096, patch_size=14, image_size=224,
                                 projection_dim=768, hidden_act="quick_gelu")),
              # facebook/dinov3-vitl16-pretrain-lvd1689m's config.json (transformers' defaults for the rest:
              # q and v biases, no k bias, a plain MLP): 4 register tokens, RoPE.
              "dinov3_vitl16_hf": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, intermediate_size=4096, patch_size=16, image_size=224,
                                   num_register_tokens=4))}


def preset(name: str, *args: str) -> ModelConfig:
    return load_config([f"model={name}", *args]).model


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def upstream(name: str, cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    """The library's own model of the preset's name, at 224 px (transformers: the released config),
    in the form its checkpoints are saved from (open_clip: both towers)."""
    with torch.device(device):
        if cfg.family == "open_clip":
            import open_clip

            return open_clip.create_model(cfg.arch, pretrained=None, device=device)
        if cfg.family == "timm":
            import timm

            return timm.create_model(cfg.arch, pretrained=False, num_classes=0, img_size=cfg.image_size)
        import transformers

        model_cls, config_cls, sizes = HF_CONFIGS[name]
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes))


def image_tower(name: str, model: torch.nn.Module) -> torch.nn.Module:
    return model.visual if preset(name).family == "open_clip" else model


def backbone_count(name: str, cfg: ModelConfig) -> int:
    """The parameter count the preset must have: the library's own image tower of that name (built on
    the meta device: no memory). transformers: the released config, whose position embedding is for
    its own image size (518 px for DINOv2: 1,370 positions), kept and interpolated at 224 px, as
    transformers does with the released weights."""
    return count(image_tower(name, upstream(name, cfg, "meta")))


def test_vitl14_forward_of_one_image_at_full_size():
    """The OpenAI CLIP ViT-L/14 preset as it is: QuickGELU, 24 blocks of width 1024, 224 px, one image."""
    cfg = preset("vitl14_clip")
    model = build_encoder(cfg, seed=0).eval()
    assert count(model.backbone) == backbone_count("vitl14_clip", cfg) == 303_966_208
    blocks = model.backbone.transformer.resblocks
    assert len(blocks) == 24 and blocks[0].attn.embed_dim == 1024 and model.backbone.patch_size == (14, 14)
    assert type(blocks[0].mlp.gelu).__name__ == "QuickGELU"  # the OpenAI weights' activation
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def save_upstream(name: str, cfg: ModelConfig, folder) -> tuple[str, dict[str, torch.Tensor]]:
    """The library's model saved as its checkpoints are (open_clip: a full CLIP .safetensors; timm:
    model.safetensors; transformers: a save_pretrained folder); (path, a few of its image tower's
    tensors, by the preset backbone's names)."""
    from safetensors.torch import save_file

    model = upstream(name, cfg)
    tower = image_tower(name, model)
    picks = [n for n, _ in tower.named_parameters()]
    picks = {n: tower.state_dict()[n].clone() for n in (picks[0], picks[len(picks) // 2], picks[-1])}
    if cfg.family == "open_clip":
        path = folder / "open_clip_model.safetensors"
        save_file(model.state_dict(), str(path))
    elif cfg.family == "timm":
        path = folder / "model.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = folder
        model.save_pretrained(folder)
        picks = {f"model.{n}": t for n, t in picks.items()}
    return str(path), picks


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_at_full_size_loads_upstream_weights(name, tmp_path):
    cfg = preset(name)
    path, picks = save_upstream(name, cfg, tmp_path)  # the upstream model is freed on return
    model = build_encoder(preset(name, f"model.pretrained={path}"), seed=0).eval()
    assert count(model.backbone) == backbone_count(name, cfg)
    state = model.backbone.state_dict()
    for key, tensor in picks.items():
        assert torch.equal(state[key], tensor), key
    with torch.no_grad():
        out = model(torch.randn(4, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (4, cfg.embed_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vitl14_clip", "dinov2_vitl14", "dinov2_vitl14_hf", "clip_vitl14_hf", *NEW_L])
def test_vitl14_two_pass_step_at_full_size(name, tmp_path):
    """parallel=none, grad checkpointing on, global batch 4 (2 classes x 2), chunk 1: the two-pass
    step equals the one-pass step on the whole batch (per tensor, 1e-2 of the update; 1e-3 over all)."""
    result = run_step(1, name, "none", tmp_path)
    assert result["max_update_error"] <= 1e-2 and result["total_update_error"] <= 1e-3, result
    if name in PROJECTION_TAKES_THE_UPDATE:  # the rule above compares the projection alone: the blocks too
        assert result["block_tensors_compared"] > 40 and result["max_block_update_error"] <= 1e-2, result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GIANTS))
def test_giant_preset_has_the_librarys_parameter_count(name):
    """DINOv3 ViT-7B and ViT-H+, PE-Core bigG: the preset's backbone and the library's model, both on the
    meta device."""
    cfg = preset(name)
    with torch.device("meta"):
        ours = count(build_encoder(cfg, seed=0).backbone)
    assert ours == backbone_count(name, cfg) == GIANTS[name]


@pytest.fixture(autouse=True)
def release_memory():
    """The models these tests build in this process are freed at their end; glibc would keep the
    memory (2.6 GiB after the ViT-g/14 load tests), which the ViT-g/14 steps' processes need."""
    yield
    gc.collect()
    host_memory.release_free_memory()


def free_gb() -> float:
    return psutil.virtual_memory().available / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
@pytest.mark.parametrize("name", ["vitg14_clip", "dinov2_vitg14"])
def test_vitg14_sharded_step_equals_one_process(name, backend, tmp_path):
    """2 processes, each holding half of the ViT-g/14's weights and gradients, take the two-pass step;
    the weights after it equal one process's one-pass step (per tensor, 1e-2 of the update)."""
    need = 21 if backend == "zero3" else 17  # GiB: two ranks at 12.1 (zero3) or 8.4 GB (fsdp2) each, BENCHMARKS.md
    if free_gb() < need:
        pytest.skip(f"a ViT-g/14 {backend} step on 2 processes needs about {need} GiB free; {free_gb():.1f} GiB are")
    result = run_step(2, name, backend, tmp_path)
    assert result["max_update_error"] <= 1e-2 and result["total_update_error"] <= 1e-3, result


def test_the_step_and_its_reference_on_the_tiny_preset(tmp_path):
    """The slow tests' harness in the default suite: zero3 on 2 processes, the reference in a third."""
    result = run_step(2, "tiny", "zero3", tmp_path)
    assert result["max_update_error"] <= 1e-3 and result["tensors_compared"] > 40, result
    assert len(result["step_peak_rss_gb_per_rank"]) == 2 and result["executed_tflop"] >= 0, result
    # tools/full_size_table.py turns such a line into BENCHMARKS.md's row (the slow suite's figures)
    spec = importlib.util.spec_from_file_location("full_size_table", REPO / "tools" / "full_size_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cells = [c.strip() for c in tool.row(result).split("|")[1:-1]]
    assert cells[:2] == ["tiny", "zero3 x 2"] and cells[3] == f"{result['step_s']} s", cells
    assert cells[5].endswith(f"{max(result['step_peak_rss_gb_per_rank']):.2f} GB"), cells
    assert cells[7].startswith(f"{result['max_update_error']:.1e} / {result['total_update_error']:.1e}"), cells


def run_step(nproc: int, name: str, backend: str, folder) -> dict:
    """tests/full_size_worker.py: the step under torchrun, then the one-process reference in a process
    of its own, compared through the weights file the step wrote into `folder`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    worker = str(REPO / "tests" / "full_size_worker.py")
    results = {}
    for command in ([*launcher, worker, "step", name, backend, str(folder)], [sys.executable, worker, "reference", name, str(folder)]):
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=7200, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    if os.environ.get("FULL_SIZE_LOG"):  # the figures of BENCHMARKS.md's table, one JSON line a run
        with open(os.environ["FULL_SIZE_LOG"], "a") as log:
            log.write(json.dumps(results) + "\n")
    return results
