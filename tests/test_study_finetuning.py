"""tools/study_finetuning.py (issue 39): every arm is a valid pipeline command, and the report's numbers
(mean ± std, the difference to full finetuning with Welch's p, median step time, largest peak memory)
equal those computed here from the runs' values. The study itself is not run here."""
from __future__ import annotations

import importlib.util
import json
import statistics

from conftest import REPO
from scipy.stats import ttest_ind

from pipeline.sweep import grid as sweep
from pipeline.run_dir import RunDir

spec = importlib.util.spec_from_file_location("study_finetuning", REPO / "tools" / "study_finetuning.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

RECALL = {"train.layer_decay=1.0": [0.50, 0.52, 0.51], "train.layer_decay=0.75": [0.55, 0.56, 0.54],
          "model.lora.rank=8": [0.45, 0.47, 0.44]}
STEP_S = {"train.layer_decay=1.0": [[2.0, 1.0], [3.0], [4.0]], "train.layer_decay=0.75": [[1.0], [1.0], [1.5]],
          "model.lora.rank=8": [[0.5], [0.7], [0.6, 0.9]]}


def test_every_arm_is_a_valid_pipeline_command(tmp_path):
    for name, (grid, fixed) in study.SWEEPS.items():
        runs = sweep.plan([*grid, "seed=0"], [*study.glyphs.PROTOCOL, f"model.pretrained={tmp_path}", *fixed])
        assert len(runs) >= 2, name


def test_the_report_states_the_runs_statistics_and_costs(tmp_path):
    for name, (grid, fixed) in study.SWEEPS.items():
        folder = tmp_path / name
        folder.mkdir()
        runs = sweep.plan([*grid, "seed=0,1,2"], [])
        sweep.save_plan(folder, [*grid, "seed=0,1,2"], fixed, runs)
        summary = {}
        for run in runs:
            if run.setting not in RECALL:  # not run: summarise lists it with no statistics
                summary[run.setting] = {}
                continue
            values = RECALL[run.setting]
            stats = {"mean": statistics.mean(values), "std": statistics.stdev(values), "n": 3}
            summary[run.setting] = {"recall@1": stats}
            logs = RunDir(folder / run.name).logs
            logs.mkdir(parents=True)
            seed = int(run.value("seed"))
            lines = [{"step": i, "name": "train/step_s", "value": v} for i, v in enumerate(STEP_S[run.setting][seed])]
            lines.append({"step": 1, "name": "mem/peak_gb", "value": 1.0 + seed / 10})
            (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (folder / sweep.SUMMARY_JSON).write_text(json.dumps(summary))
    assert study.main(["--out", str(tmp_path), "--report"]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| train.") or
            line.startswith("| model.")}
    full, decay = RECALL["train.layer_decay=1.0"], RECALL["train.layer_decay=0.75"]
    p = ttest_ind(decay, full, equal_var=False).pvalue
    assert rows["train.layer_decay=0.75"] == [f"{statistics.mean(decay):.4f} ± {statistics.stdev(decay):.4f}", "n/a",
                                              f"{statistics.mean(decay) - statistics.mean(full):+.4f} (p = {p:.2g})",
                                              "1.000", "1.20"]
    assert rows["train.layer_decay=1.0"][2:] == ["", "2.500", "1.20"]  # median of 2, 1, 3, 4
    assert rows["model.lora.rank=8"][3:] == ["0.650", "1.20"]
    assert rows["model.lora.rank=32"][:3] == ["n/a", "n/a", "n/a"]  # not run
