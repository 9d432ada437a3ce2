"""`stage=all` end to end on digits, as a user runs it; skipping, resuming, rerunning."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL, run_pipeline

from pipeline.config import ModelConfig, load_config
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.eval.inference import load_embeddings
from pipeline.eval.metrics import retrieval_metrics
from pipeline.models.encoders import build_encoder, load_exported

METRICS = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}


def test_all_stages_write_their_artifacts(digits_run):
    """Every stage's output; the metrics those of the embeddings saved (computed again here by brute
    force); frozen the untrained encoder's embeddings, finetuned others. (Six steps of a random ViT do
    not reliably beat it on unseen digits: no such margin is asserted.)"""
    metrics = json.loads((digits_run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"frozen", "finetuned"}
    for values in metrics.values():
        assert METRICS <= set(values) and all(0.0 <= values[k] <= 1.0 for k in METRICS)
    cfg = load_config([*SMALL, f"run_dir={digits_run}"])
    for name, values in metrics.items():  # the eval stage's figures, against numpy on the embeddings it saved
        stored = load_embeddings(digits_run / "embeddings" / name / "test.npz")
        by_hand = loo_metrics(stored["embeddings"], stored["labels"], ks=(1, 2, 4, 8))
        for key, value in by_hand.items():  # faiss's float32 order may swap a near-tie or two
            close = 3 / len(stored["labels"]) if key.startswith("recall@") else 1e-4
            assert values[key] == pytest.approx(value, abs=close), (name, key, value)
    frozen, finetuned = (load_embeddings(digits_run / "embeddings" / m / "test.npz")["embeddings"][:4]
                         for m in ("frozen", "finetuned"))
    # frozen: the encoder as built, before any step; finetuned: another one
    index = ShardIndex.load(digits_run / "shards" / "test")
    x = torch.stack([eval_transform(cfg.model, cfg.data.eval_resize)(index.image(i)) for i in range(4)])
    with torch.no_grad():
        untrained = build_encoder(cfg.model, cfg.seed).eval()(x).numpy()
    np.testing.assert_allclose(untrained, frozen, rtol=1e-5, atol=1e-5)
    assert np.abs(finetuned - frozen).max() > 1e-3 and metrics["frozen"] != metrics["finetuned"]  # trained
    assert (digits_run / "checkpoints" / "latest").read_text() == "step_6"
    assert sorted(p.name for p in (digits_run / "checkpoints").iterdir()) == ["best", "latest", "step_3", "step_6"]
    assert list((digits_run / "tb").glob("events.out.tfevents.*")) and (digits_run / "logs" / "metrics.jsonl").is_file()
    assert (digits_run / "export" / "model.safetensors").is_file()
    assert "max_steps: 6" in (digits_run / "config.yaml").read_text()
    for stage in ("shard", "embed", "finetune", "export", "eval"):
        assert (digits_run / "stages" / f"{stage}.json").is_file()
    assert not list(digits_run.glob("*.tmp")) and not list((digits_run / "checkpoints").glob("*.tmp"))


def loo_metrics(x: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """recall@k, map@r (Musgrave et al. 2020) and r_precision, leave-one-out, by brute force in float64:
    every query's neighbours sorted by inner product, itself left out."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]  # the query itself comes last: dropped
    rel = labels[order] == labels[:, None]
    r = rel.sum(axis=1)
    scored = r > 0
    rel, r = rel[scored], r[scored]
    out = {f"recall@{k}": float(rel[:, :k].any(axis=1).mean()) for k in ks}
    ranks = np.arange(1, rel.shape[1] + 1)
    within = ranks[None, :] <= r[:, None]
    precision = np.cumsum(rel, axis=1) / ranks
    out["map@r"] = float(((precision * rel * within).sum(axis=1) / r).mean())
    out["r_precision"] = float(((rel * within).sum(axis=1) / r).mean())
    out["num_queries"], out["num_excluded"] = int(scored.sum()), int((~scored).sum())
    return out


def test_metrics_json_matches_the_stored_embeddings(digits_run):
    """The eval stage scores exactly the embeddings the export reproduces."""
    stored = load_embeddings(digits_run / "embeddings" / "finetuned" / "test.npz")
    metrics = json.loads((digits_run / "eval" / "metrics.json").read_text())["finetuned"]
    again = retrieval_metrics(stored["embeddings"], stored["labels"], nmi=False)
    assert again["recall@1"] == metrics["recall@1"] and again["map@r"] == metrics["map@r"]
    assert set(stored["labels"]) == {5, 6, 7, 8, 9}
    model = load_exported(digits_run / "export")
    cfg = ModelConfig(**json.loads((digits_run / "export" / "config.json").read_text()))
    index = ShardIndex.load(digits_run / "shards" / "test")
    x = torch.stack([eval_transform(cfg)(index.image(i)) for i in range(4)])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), stored["embeddings"][:4], rtol=1e-5, atol=1e-5)


def test_completed_stages_are_skipped(digits_run):
    before = (digits_run / "eval" / "metrics.json").stat().st_mtime_ns
    proc = run_pipeline("stage=all", f"run_dir={digits_run}", *SMALL)
    for stage in ("shard", "embed", "finetune", "export", "eval"):
        assert f"[{stage}] complete, skipped" in proc.stderr
    assert (digits_run / "eval" / "metrics.json").stat().st_mtime_ns == before


def test_eval_alone_runs_missing_prerequisites(tmp_path):
    proc = run_pipeline("stage=eval", f"run_dir={tmp_path}", *SMALL, "train.max_steps=2")
    for stage in ("shard", "embed", "finetune", "export", "eval"):
        assert f"[{stage}] running" in proc.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_changed_settings_rerun_the_stages_after_them(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    proc = run_pipeline("stage=eval", f"run_dir={run}", *SMALL, "eval.ks=[1,4]")
    assert "[finetune] complete, skipped" in proc.stderr and "[eval] running" in proc.stderr
    assert set(json.loads((run / "eval" / "metrics.json").read_text())["frozen"]) >= {"recall@1", "recall@4"}


def test_resume_with_other_non_architecture_settings(digits_run, tmp_path):
    """Activation checkpointing or another drop-path rate still fit the checkpoint's weights."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    proc = run_pipeline("stage=finetune", f"run_dir={run}", *SMALL, "model.grad_checkpointing=true",
                        "model.drop_path=0.0", "train.max_steps=7")
    assert "resuming from" in proc.stderr and "step 7/7" in proc.stderr


def test_checkpoint_from_another_model_is_refused(digits_run, tmp_path):
    """Another model on a finished run is refused before anything runs (issue 22); a checkpoint folder
    from another model config is refused when it is loaded."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    proc = run_pipeline("stage=finetune", f"run_dir={run}", *SMALL, "model.embed_dim=24", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model.embed_dim=24 would change the finished embed stage of {run} (made with model.embed_dim=32); "
        "to redo it and the stages after it add force=true, or use a new run_dir"]
    proc = run_pipeline("stage=eval", f"run_dir={tmp_path / 'other'}", *SMALL, "model.embed_dim=24",
                        "eval.models=[checkpoint]", f"eval.checkpoint={run / 'checkpoints' / 'step_6'}", check=False)
    assert proc.returncode == 2
    assert "was made by another model config (differs in model.embed_dim)" in proc.stderr.strip().splitlines()[-1]
