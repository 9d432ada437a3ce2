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

from pipeline import sweep

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
        runs = sweep.plan([*grid, "seed=0,1,2"], [*study.CONVERGENCE_PROTOCOL, f"model.pretrained={tmp_path}", *fixed])
        assert len(runs) == 6, name
    assert "train.val_every_epochs=1" in study.CONVERGENCE_PROTOCOL
    assert study.plateaued([0.1, 0.3, 0.401, 0.405, 0.402, 0.404, 0.403]) and not study.plateaued([0.3, 0.32, 0.34, 0.36, 0.38])
