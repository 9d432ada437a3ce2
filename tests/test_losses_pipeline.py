"""`loss=<name>` through the CLI: a loss with parameters trains, checkpoints, resumes; export holds the encoder only."""
import copy

import torch
from conftest import SMALL, run_pipeline
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from pipeline.config import ModelConfig
from pipeline.parallel import checkpoint
from pipeline.losses.intra_batch import IntraBatchLoss
from pipeline.models.encoders import build_encoder


def test_mpn_end_to_end_and_resume(tmp_path):
    run_dir = tmp_path / "mpn"
    run_pipeline("stage=all", f"run_dir={run_dir}", "loss=mpn", *SMALL)
    assert (run_dir / "eval" / "metrics.json").is_file()

    exported = load_file(run_dir / "export" / "model.safetensors")
    encoder = build_encoder(ModelConfig(depth=2, embed_dim=32, patch_size=8), 0).state_dict()
    assert set(exported) == set(encoder), "export must hold the encoder alone (no MPN, no classifiers)"

    saved = FileSystemReader(str(run_dir / "checkpoints" / "step_6" / "loss")).read_metadata().state_dict_metadata
    assert any(k.startswith("model.layers.0.attention") for k in saved)
    assert any(k.startswith("optim.") for k in saved)
    # The loss's parameters trained: the checkpoint's differ from their initialisation.
    fresh = IntraBatchLoss(32, range(5), layers=1, heads=2, seed=0)   # the mpn preset: IBC's CUB configuration
    loaded = copy.deepcopy(fresh)
    checkpoint.load_dcp(run_dir / "checkpoints" / "step_6" / "loss", loaded)
    for name, p in fresh.named_parameters():
        trained = not torch.equal(p, dict(loaded.named_parameters())[name])
        assert trained == p.requires_grad, f"{name}: trained {trained}"   # the neck's frozen shift stays 0

    resumed = run_pipeline("stage=finetune", f"run_dir={run_dir}", "loss=mpn", *SMALL, "train.max_steps=8")
    assert "resuming from" in resumed.stderr + (run_dir / "logs" / "rank0.log").read_text()
    assert (run_dir / "checkpoints" / "step_8").is_dir()

    other = run_pipeline("stage=finetune", f"run_dir={run_dir}", "loss=proxy_anchor", *SMALL, "train.max_steps=10",
                         check=False)
    assert other.returncode == 2 and "made with another loss" in other.stderr


def test_unknown_loss_preset_is_one_line(tmp_path):
    proc = run_pipeline("stage=finetune", f"run_dir={tmp_path}", "loss=nope", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown preset loss=nope" in proc.stderr
