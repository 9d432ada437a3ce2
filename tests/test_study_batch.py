"""tools/study_batch.py (issue 40) on fabricated run folders, no training: its sweeps are valid pipeline
commands with the pre-registered settings, the bracket adds the next lr for an edge best and chooses on
the final validation recall@1, --plan lists what is left, and the report's numbers (means, Welch's p,
the decision, the equal-steps view, the shares beyond k) equal those computed here."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from scipy.stats import ttest_ind

from pipeline.config import load_config
from pipeline.data.sampler import PKSampler
from pipeline.eval.positives_beyond_k import positive_ranks
from pipeline.sweep import grid as sweep

spec = importlib.util.spec_from_file_location("study_batch", REPO / "tools" / "study_batch.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study_batch"] = study  # its dataclass looks its module up
spec.loader.exec_module(study)

EPOCHS, PER_EPOCH = 15, {128: 95, 1024: 11}
RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(525), 4)                       # 2,100 training images: 16 and 2 batches an epoch
FROZEN = RNG.normal(size=(2100, 8)).astype(np.float32)


def _run(path: Path, final_val: float, test: float, map_r: float, batch: int, embeddings: np.ndarray | None = None):
    """A finished run: eval/metrics.json, a validation after each epoch rising to final_val, train embeddings."""
    (path / "eval").mkdir(parents=True)
    (path / "eval" / "metrics.json").write_text(json.dumps({"finetuned": {"recall@1": test, "map@r": map_r}}))
    (path / "logs").mkdir()
    steps = [PER_EPOCH[batch] * (e + 1) for e in range(EPOCHS)]
    values = [final_val - 0.01 * (EPOCHS - 1 - e) for e in range(EPOCHS)]
    (path / "logs" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "name": "val/recall@1", "value": v}) + "\n" for s, v in zip(steps, values)))
    if embeddings is not None:
        (path / "embeddings" / "finetuned").mkdir(parents=True)
        np.savez(path / "embeddings" / "finetuned" / "train.npz", embeddings=embeddings, labels=LABELS)


def test_every_sweep_is_a_valid_command_with_the_preregistered_settings(tmp_path):
    for name, grid, fixed in (study.bracket_sweep(tmp_path, 128, list(study.FIRST[128])),
                              study.confirm_sweep(tmp_path, 1024, "2.8e-4")):
        runs = sweep.plan(grid, fixed)  # load_config on every run: a renamed key fails here
        cfg = load_config(sweep.args(runs[-1], fixed, tmp_path))
        t = cfg.train
        assert (t.epochs, t.warmup_fraction, t.head_lr, t.include_query_in_rank, t.val_every, t.val_every_epochs) == \
            (15, 0.05, None, True, 0, 1), name
        assert cfg.data.seed == 0 and t.samples_per_class == study.SAMPLES_PER_CLASS
    assert len(runs) == 6 and {r.value("loss") for r in runs} == {"rsk", "rsk_simix"} and t.global_batch == 1024
    assert study.interleave([[1, 2, 3], ["a", "b"]]) == [1, "a", 2, "b", 3]


def test_the_choice_and_the_edge_rule():
    assert study.choose({"5e-5": 0.70, "1e-4": 0.75, "2e-4": 0.72}, study.LADDERS[128]) == study.Choice("1e-4", ("5e-5", "1e-4", "2e-4"), True, None)
    low = study.choose({"5e-5": 0.76, "1e-4": 0.75, "2e-4": 0.72}, study.LADDERS[128])
    assert (low.lr, low.next_lr, low.complete, low.inside) == ("5e-5", "2.5e-5", False, False)
    tie = study.choose({"1e-4": 0.7, "2.8e-4": 0.7, "8e-4": 0.6}, study.LADDERS[1024])
    assert tie.lr == "1e-4" and tie.next_lr == "3.5e-5"                       # a tie: the lower lr
    waiting = study.choose({"1e-4": 0.7, "2.8e-4": None, "8e-4": 0.6}, study.LADDERS[1024])
    assert not waiting.complete and waiting.next_lr is None
    end = study.choose({"8e-4": 0.6, "2.3e-3": 0.65, "6.4e-3": 0.7}, study.LADDERS[1024])    # the ladder ends: chosen, at the edge
    assert end.complete and end.lr == "6.4e-3" and not end.inside


@pytest.mark.parametrize("diff, p, inside, verdict", [
    (0.005, 0.01, True, "reproduced"), (0.004, 0.001, True, "no detectable effect"),
    (-0.006, 0.01, True, "refuted at this scale"), (-0.006, 0.01, False, "no detectable effect (the large"),
    (0.02, 0.06, True, "no detectable effect"), (0.02, None, True, "not decided")])
def test_the_decision_rule(diff, p, inside, verdict):
    assert study.decide(diff, p, inside, complete=p is not None).startswith(verdict)


BRACKET = {(128, "5e-5"): 0.70, (128, "1e-4"): 0.75, (128, "2e-4"): 0.72,
           (1024, "1e-4"): 0.60, (1024, "2.8e-4"): 0.68, (1024, "8e-4"): 0.71}
TESTS = {("rsk", 128): [0.420, 0.423, 0.425], ("rsk", 1024): [0.410, 0.412, 0.409],
         ("rsk_simix", 128): [0.430, 0.431, 0.428], ("rsk_simix", 1024): [0.431, 0.429, 0.433]}


def _frozen(out: Path) -> None:
    (out / "frozen" / "eval").mkdir(parents=True)
    (out / "frozen" / "eval" / "metrics.json").write_text(json.dumps({"frozen": {"recall@1": 0.33}}))
    (out / "frozen" / "embeddings" / "frozen").mkdir(parents=True)
    np.savez(out / "frozen" / "embeddings" / "frozen" / "train.npz", embeddings=FROZEN, labels=LABELS)


def _share(x, batch, seed):
    """Independent of share_beyond_k: the batches drawn here, the ranks counted pair by pair."""
    sampler = PKSampler(LABELS, batch, 4, seed)
    ranks = np.concatenate([positive_ranks(x[b], LABELS[b], True) for b in
                            (sampler.batch(s) for s in range(len(LABELS) // batch))])
    return float((ranks > 16).mean())


def test_plan_bracket_extension_and_report(tmp_path, capsys):
    _frozen(tmp_path)
    for (batch, lr), value in BRACKET.items():
        _run(study.bracket_run(tmp_path, batch, lr), value, value - 0.3, 0.1, batch)
    study.main(["--out", str(tmp_path), "--plan"])
    plan = capsys.readouterr().out
    assert "bracket: batch 1024 lr 2.3e-3 seed 0: to run" in plan          # 8e-4 won at the top edge
    assert "bracket: batch 128 lr 1e-4 seed 0: done" in plan and "confirm: 6 runs per batch" in plan
    study.main(["--out", str(tmp_path), "--report"])
    assert "The bracket is not finished" in (tmp_path / "batch.md").read_text()

    _run(study.bracket_run(tmp_path, 1024, "2.3e-3"), 0.69, 0.39, 0.1, 1024)
    finals = {}
    for (loss, batch), tests in TESTS.items():
        lr = "1e-4" if batch == 128 else "8e-4"
        for seed, test in zip(study.SEEDS, tests):
            x = FROZEN + RNG.normal(size=FROZEN.shape).astype(np.float32) * 0.1 * seed
            _run(study.confirm_run(tmp_path, batch, lr, loss, seed), 0.7 + test / 10, test, test / 4, batch, x)
            finals.setdefault((loss, batch), []).append((seed, x))
    study.main(["--out", str(tmp_path), "--plan"])
    plan = capsys.readouterr().out
    assert "chosen: batch 1024 at lr 8e-4\n" in plan and "confirm: batch 128 lr 1e-4 loss=rsk_simix seed 3: done" in plan

    study.main(["--out", str(tmp_path), "--report"])
    report = (tmp_path / "batch.md").read_text()
    small, large = TESTS["rsk", 128], TESTS["rsk", 1024]
    diff, p = statistics.mean(large) - statistics.mean(small), ttest_ind(large, small, equal_var=False).pvalue
    assert diff <= -0.005 and p < 0.05
    assert f"test recall@1 {diff:+.4f} (p = {p:.2g}) -> **refuted at this scale" in report
    simix = [statistics.mean(TESTS["rsk_simix", b]) for b in (128, 1024)]
    assert f"**rsk_simix** (the same pair with SiMix): test recall@1 {simix[1] - simix[0]:+.4f}" in report
    assert "-> **no detectable effect**" in report
    assert "| 1024 | 8e-4 | 0.7100 | 0.7100 | 0.4100 | 0.1000 | **chosen** |" in report
    assert "The frozen encoder (the start of every run): test recall@1 0.3300." in report
    assert "Chosen: batch 128 at 1e-4, batch 1024 at 8e-4: the large batch's lr is 8 x" in report
    row = next(l for l in report.splitlines() if l.startswith("| rsk | 1024 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{statistics.mean(large):.4f} ± {statistics.stdev(large):.4f} (3)"
    start = [_share(FROZEN, 1024, s) for s in study.SEEDS]
    end = [_share(x, 1024, s) for s, x in finals["rsk", 1024]]
    assert cells[6] == f"{statistics.mean(start):.4f} ± {statistics.stdev(start):.4f} (3)"
    assert cells[7] == f"{statistics.mean(end):.4f} ± {statistics.stdev(end):.4f} (3)"
    # equal steps: batch 1,024's last step is 165, between batch 128's validations at 95 and 190
    def curve(final, e):  # _run's validation after epoch e + 1
        return final - 0.01 * (EPOCHS - 1 - e)
    f128 = statistics.mean(0.7 + t / 10 for t in small)
    f1024 = statistics.mean(0.7 + t / 10 for t in large)
    at165 = np.interp(165, [95, 190], [curve(f128, 0), curve(f128, 1)])
    at_images = np.interp(165 * 1024 / 128, [1235, 1330], [curve(f128, 12), curve(f128, 13)])  # step 1,320
    assert f"| rsk | {f1024:.4f} | {at165:.4f} | {at_images:.4f} | {f128:.4f} |" in report
    assert (tmp_path / "batch.png").stat().st_size > 0
