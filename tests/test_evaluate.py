"""The eval stage: any model (frozen, checkpoint, exported folder), its files, torchrun, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMALL, run_pipeline, run_torchrun
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.data.shards import ShardIndex
from pipeline.data.transforms import eval_transform
from pipeline.parallel import checkpoint
from pipeline.errors import UserError
from pipeline.eval import results
from pipeline.eval.diagnostics import embedding_diagnostics
from pipeline.eval.failures import failures as failures_of
from pipeline.eval.inference import load_embeddings, save_embeddings
from pipeline.eval.metrics import retrieval_metrics
from pipeline.models.encoders import build_encoder
from pipeline.protocols import Evaluation, resolve
from pipeline.run_dir import RunDir


def metrics_of(run):
    return json.loads((run / "eval" / "metrics.json").read_text())


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_same(ours: dict, theirs: dict):
    """Two {model: {name: value}} files hold the same values (to float rounding)."""
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, dict):
            assert_same(ours[key], value)
        else:
            assert ours[key] == pytest.approx(value), key


def test_eval_writes_plots_report_and_diagnostics(digits_run):
    ev = digits_run / "eval"
    assert sorted(p.name for p in ev.iterdir()) == ["diagnostics.json", "failures.json", "metrics.json",
                                                   "recall_at_k.png", "report.md", "retrievals.json", "retrievals.png",
                                                   "spectrum.png", "training.png"]
    test = load_embeddings(digits_run / "embeddings" / "finetuned" / "test.npz")  # the last model's, leave-one-out
    failures = json.loads(json.dumps(failures_of(Evaluation("test", "test"), {"test": test}, "finetuned")))
    assert json.loads((ev / "failures.json").read_text()) == failures and failures["wrong"] > 0
    for png in ("recall_at_k.png", "spectrum.png", "retrievals.png", "training.png"):
        with Image.open(ev / png) as image:
            assert image.format == "PNG" and min(image.size) > 100
    diagnostics = json.loads((ev / "diagnostics.json").read_text())
    assert set(diagnostics) == {"frozen", "finetuned"}
    for model, by_split in diagnostics.items():
        assert set(by_split) == {"test", "train"}
        for split, values in by_split.items():
            stored = load_embeddings(digits_run / "embeddings" / model / f"{split}.npz")
            assert values == pytest.approx(embedding_diagnostics(stored["embeddings"], stored["labels"]))
    metrics = metrics_of(digits_run)
    report = (ev / "report.md").read_text()
    for model in ("frozen", "finetuned"):
        assert f"| {model} | {metrics[model]['recall@1']:.4f} | {metrics[model]['recall@2']:.4f} |" in report
    delta = metrics["finetuned"]["map@r"] - metrics["frozen"]["map@r"]
    assert "| finetuned - frozen |" in report and f"{delta:+.4f}" in report
    assert "896 queries scored, 0 excluded" in report


def test_eval_of_a_checkpoint(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "run")
    run_pipeline("stage=eval", f"run_dir={run}", *SMALL, "eval.models=[checkpoint]", "eval.checkpoint=step_3",
                 "eval.diagnostics=false")
    assert set(metrics_of(run)) == {"checkpoint"}
    stored = load_embeddings(run / "embeddings" / "checkpoint" / "test.npz")
    again = retrieval_metrics(stored["embeddings"], stored["labels"])
    assert again == metrics_of(run)["checkpoint"]
    # The same embeddings as the step-3 weights loaded by hand.
    cfg = load_config([f"run_dir={run}", *SMALL])
    model = build_encoder(cfg.model, cfg.seed)
    checkpoint.load_weights(run / "checkpoints" / "step_3", model)
    index = ShardIndex.load(run / "shards" / "test")
    with torch.no_grad():
        x = model.eval()(torch.stack([eval_transform(cfg.model)(index.image(i)) for i in range(4)]))
    np.testing.assert_allclose(x.numpy(), stored["embeddings"][:4], rtol=1e-5, atol=1e-5)
    finetuned = load_embeddings(run / "embeddings" / "finetuned" / "test.npz")["embeddings"]
    assert not np.allclose(finetuned[:4], stored["embeddings"][:4], atol=1e-3)   # step 3 is not step 6


def test_eval_of_an_exported_folder_needs_no_training(digits_run, tmp_path):
    """A run directory with shards only evaluates another run's export: nothing is trained or embedded."""
    run = tmp_path / "fresh"
    shutil.copytree(digits_run / "shards", run / "shards")
    (run / "stages").mkdir()
    shutil.copy(digits_run / "stages" / "shard.json", run / "stages" / "shard.json")
    proc = run_pipeline("stage=eval", f"run_dir={run}", *SMALL, "eval.models=[finetuned]",
                        f"eval.export={digits_run / 'export'}", "eval.diagnostics=false")
    assert "[shard] complete, skipped" in proc.stderr
    assert not any(f"[{s}] running" in proc.stderr for s in ("embed", "finetune", "export"))
    assert_same(metrics_of(run), {"finetuned": metrics_of(digits_run)["finetuned"]})


def test_eval_under_torchrun_matches_one_process(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "run")
    run_torchrun(2, "stage=eval", "force=true", f"run_dir={run}", *SMALL)
    for name in ("metrics.json", "diagnostics.json"):
        assert_same(json.loads((run / "eval" / name).read_text()), json.loads((digits_run / "eval" / name).read_text()))
    assert not (run / "eval.tmp").exists()
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["metrics.jsonl", "rank0.log", "rank1.log"]


def test_nan_embeddings_end_in_one_line(digits_run, tmp_path):
    run = copy_run(digits_run, tmp_path / "run")
    path = run / "embeddings" / "frozen" / "test.npz"
    data = load_embeddings(path)
    data["embeddings"][3, 1] = np.nan
    save_embeddings(path, data)
    proc = run_pipeline("stage=eval", "force=true", f"run_dir={run}", *SMALL, "eval.models=[frozen]", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: frozen embeddings of test: query contains NaN or inf values (row 3 is the first)")


def test_bad_eval_models_is_one_line():
    with pytest.raises(UserError, match="eval.models=.*list some of frozen, finetuned, checkpoint, each once"):
        load_config(["eval.models=[frozen,frozen]"])
    with pytest.raises(UserError, match="list some of"):
        load_config(["eval.models=[best]"])


def clustered(rng, n_classes, per_class, dim=8):
    labels = np.repeat(np.arange(n_classes), per_class)
    x = rng.standard_normal((n_classes, dim))[labels] + 0.8 * rng.standard_normal((len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_vehicleid_reports_each_test_size(tmp_path):
    """Leave-one-out inside each test list (the RS@k authors' protocol), nested in metrics.json, against
    a brute-force numpy recall@k."""
    rng = np.random.default_rng(0)
    rd = RunDir(tmp_path)
    cfg = Config()
    cfg.data.name = "vehicleid"
    cfg.eval.show_queries = 0  # no retrievals.png: these embeddings have no shards to show
    proto = resolve("vehicleid", None, None, None)
    for model in ("frozen", "finetuned"):
        for size in (800, 1600, 2400):
            x, labels = clustered(rng, size // 100, 4)
            save_embeddings(rd.embeddings(model) / f"test{size}.npz",
                            {"embeddings": x, "labels": labels, "keys": np.arange(len(x)).astype(str)})
    results.write_results(cfg, rd, proto, proto.splits, {"frozen": "a", "finetuned": "b"})
    metrics = metrics_of(tmp_path)
    assert set(metrics) == {"frozen", "finetuned"}
    for model in ("frozen", "finetuned"):
        assert set(metrics[model]) == {"test800", "test1600", "test2400"}
        for size in (800, 1600, 2400):
            data = load_embeddings(rd.embeddings(model) / f"test{size}.npz")
            x, labels = data["embeddings"], data["labels"]
            sim = x @ x.T
            np.fill_diagonal(sim, -np.inf)                   # leave the query itself out
            order = np.argsort(-sim, axis=1, kind="stable")
            for k in (1, 5):
                hit = (labels[order[:, :k]] == labels[:, None]).any(1).mean()
                assert metrics[model][f"test{size}"][f"recall@{k}"] == pytest.approx(hit, abs=1e-6)
            assert "recall@2" not in metrics[model][f"test{size}"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.count("## Retrieval: test") == 3
    assert set(json.loads((tmp_path / "eval" / "diagnostics.json").read_text())["frozen"]) == set(proto.splits)
