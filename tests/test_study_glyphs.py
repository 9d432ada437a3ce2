"""tools/study_glyphs.py: every sweep of the study is a valid pipeline command, and the report's
numbers (mean ± std, differences, Welch's p) equal those computed here from the runs' values.
The study itself (2 hours) is not run: BENCHMARKS.md records it."""
from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from scipy.stats import ttest_ind

from pipeline.sweep import grid as sweep

spec = importlib.util.spec_from_file_location("study_glyphs", REPO / "tools" / "study_glyphs.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

# recall@1 of three seeds per setting, as the sweeps' summaries would hold them
RUNS = {
    ("rsk", "loss=rsk train.global_batch=128"): [0.350, 0.356, 0.353],
    ("rsk", "loss=rsk_simix train.global_batch=128"): [0.367, 0.365, 0.369],
    ("rsk", "loss=rsk train.global_batch=2048"): [0.354, 0.351, 0.356],
    ("losses", "loss=margin"): [0.340, 0.347, 0.344],
    ("rho", "loss.p_switch=0"): [0.338, 0.341, 0.337],
    ("rho", "loss.p_switch=0.35"): [0.300, 0.303, 0.298],
}
FROZEN = 0.3252


def test_every_sweep_of_the_study_is_a_valid_pipeline_command(tmp_path):
    for name, (grid, fixed) in study.SWEEPS.items():
        words = [*study.PROTOCOL, f"model.pretrained={tmp_path}", *fixed]
        runs = sweep.plan([*grid, "seed=0,1,2"], words)  # load_config on every run: a renamed key fails here
        assert len(runs) >= 3, name


def _stats(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "n": len(values)}


def _study_folder(out: Path) -> None:
    """The files the report reads: the frozen run's eval and each sweep's summary.json."""
    (out / "frozen" / "eval").mkdir(parents=True)
    (out / "frozen" / "eval" / "metrics.json").write_text(json.dumps({"frozen": {"recall@1": FROZEN, "map@r": 0.0787}}))
    (out / "frozen" / "eval" / "diagnostics.json").write_text(
        json.dumps({"frozen": {"test": {"rho": 0.699, "pi_ratio": 0.68}, "train": {"rho": 0.7, "pi_ratio": 0.68}}}))
    summaries: dict[str, dict] = {}
    for (name, setting), values in RUNS.items():
        summaries.setdefault(name, {})[setting] = {"recall@1": _stats(values), "map@r": _stats([v / 4 for v in values])}
    for name, summary in summaries.items():  # query_in_rank not run: its rows must say n/a
        (out / name).mkdir()
        (out / name / sweep.SUMMARY_JSON).write_text(json.dumps(summary))


def _welch(a, b) -> str:
    diff = statistics.mean(b) - statistics.mean(a)
    return f"{diff:+.4f} (p = {ttest_ind(b, a, equal_var=False).pvalue:.2g})"


def _row(report: str, name: str, after: str = "") -> list[str]:
    """The cells of the first table row named `name` after the text `after`."""
    line = next(l for l in report[report.index(after):].splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_report_states_the_runs_statistics_and_welch_p(tmp_path):
    _study_folder(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "study_glyphs.py"), "--out", str(tmp_path), "--report"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    rsk, simix = RUNS["rsk", "loss=rsk train.global_batch=128"], RUNS["rsk", "loss=rsk_simix train.global_batch=128"]
    margin = RUNS["losses", "loss=margin"]

    assert _row(report, "frozen (the pretrained encoder)")[1] == f"{FROZEN:.4f}"
    assert _row(report, "loss=rsk_simix")[1] == f"{statistics.mean(simix):.4f} ± {statistics.stdev(simix):.4f}"
    assert _row(report, "loss=rsk_simix")[2] == "n/a"  # recall@4 is in no summary
    # minus frozen (one run: no p), minus RS@k (Welch)
    assert _row(report, "loss=margin", after="minus RS@k")[1:] == [f"{statistics.mean(margin) - FROZEN:+.4f}", _welch(rsk, margin)]
    assert _row(report, "128")[-1] == _welch(rsk, simix)
    big = RUNS["rsk", "loss=rsk train.global_batch=2048"]
    assert f"2,048 - 128, recall@1: RS@k {_welch(rsk, big)}, + SiMix n/a." in report
    p0, p35 = RUNS["rho", "loss.p_switch=0"], RUNS["rho", "loss.p_switch=0.35"]
    assert f"p = 0.35 - p = 0: recall@1 {_welch(p0, p35)}" in report
    assert _row(report, "include_query_in_rank=true (the authors' code)")[1] == "n/a"
    assert re.search(r"true - false: recall@1 n/a", report)
    assert (tmp_path / "losses.png").stat().st_size > 0


def test_the_convergence_sweeps_are_valid_pipeline_commands(tmp_path):
    """--convergence (issue 23): its sweeps pass the config check; equal images seen in both batch arms."""
    for name, (grid, fixed) in study.CONVERGENCE.items():
        runs = sweep.plan(["seed=0,1,2", *grid], [*study.CONVERGENCE_PROTOCOL, f"model.pretrained={tmp_path}", *fixed])
        assert len(runs) == 6, name
        # seed first (run_sweeps(seed_first=True)): each seed's two arms are neighbours, run side by side
        assert [r.setting for r in runs[:2]] == [r.setting for r in runs[2:4]] and runs[0].setting != runs[1].setting
    assert "train.val_every_epochs=1" in study.CONVERGENCE_PROTOCOL
    assert study.plateaued([0.1, 0.3, 0.401, 0.405, 0.402, 0.404, 0.403]) and not study.plateaued([0.3, 0.32, 0.34, 0.36, 0.38])


# validation recall@1 after each epoch, per run, as a convergence sweep's runs would log them
CURVES = {
    ("convergence_batch", "train.global_batch=128"): [[0.60, 0.70, 0.72], [0.62, 0.71, 0.73], [0.61, 0.69, 0.74]],
    ("convergence_batch", "train.global_batch=1024"): [[0.58, 0.66, 0.70], [0.57, 0.67, 0.71], [0.59, 0.65, 0.69]],
    ("convergence_rho", "loss.p_switch=0"): [[0.50, 0.55, 0.56], [0.51, 0.54, 0.57]],  # a seed short: 2 runs
    ("convergence_rho", "loss.p_switch=0.35"): [[0.48, 0.52, 0.55], [0.49, 0.53, 0.54]],
}


def _convergence_folder(out: Path) -> dict[tuple[str, str], list[float]]:
    """Each sweep's plan, each run's metrics.jsonl and each setting's summary; the test recall@1 of a
    run is its last validation's value plus 0.01. Returns the test values per arm."""
    tests: dict[tuple[str, str], list[float]] = {}
    for (name, setting), runs in CURVES.items():
        for seed, values in enumerate(runs):
            run = sweep.Run((f"seed={seed}", setting))
            logs = out / name / run.name / "logs"
            logs.mkdir(parents=True)
            (logs / "metrics.jsonl").write_text("".join(
                json.dumps({"step": 10 * (e + 1), "name": "val/recall@1", "value": v}) + "\n" for e, v in enumerate(values)))
            tests.setdefault((name, setting), []).append(values[-1] + 0.01)
    for name in {n for n, _ in CURVES}:
        arms = [(s, runs) for (n, s), runs in CURVES.items() if n == name]
        sweep.save_plan(out / name, [], [], [sweep.Run((f"seed={i}", s)) for s, runs in arms for i in range(len(runs))])
        (out / name / sweep.SUMMARY_JSON).write_text(json.dumps(
            {s: {"recall@1": _stats(tests[name, s])} for s, _ in arms}))
    return tests


def test_the_convergence_report_states_the_curves_and_the_differences(tmp_path):
    tests = _convergence_folder(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "study_glyphs.py"), "--out", str(tmp_path), "--convergence",
                           "--report"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "convergence.md").read_text()
    small, large = tests["convergence_batch", "train.global_batch=128"], tests["convergence_batch", "train.global_batch=1024"]
    assert f"train.global_batch=1024 - train.global_batch=128, test recall@1 {_welch(small, large)}." in report
    p0, p35 = tests["convergence_rho", "loss.p_switch=0"], tests["convergence_rho", "loss.p_switch=0.35"]
    assert f"loss.p_switch=0.35 - loss.p_switch=0, test recall@1 {_welch(p0, p35)}." in report
    # the curves' table: the mean over the runs at each epoch, in the order the arms were found
    header = next(l for l in report.splitlines() if l.startswith("| epoch |"))
    arms = [c.strip() for c in header.strip("|").split("|")][1:]
    for epoch in range(3):
        row = _row(report, str(epoch + 1), after="| epoch |")
        for arm, value in zip(arms, row[1:]):
            name = "convergence_batch" if arm.startswith("train.") else "convergence_rho"
            assert value == f"{statistics.mean(run[epoch] for run in CURVES[name, arm]):.4f}", (arm, epoch)
    assert _row(report, "convergence_rho: loss.p_switch=0")[4] == "0 of 2"  # 3 validations: too few to plateau
    assert (tmp_path / "convergence.png").stat().st_size > 0
