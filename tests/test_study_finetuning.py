"""tools/study_finetuning.py (issue 39) on fabricated run folders, no training: every arm's bracket,
confirmation and cost runs are valid pipeline commands with the protocol's settings, each arm's bracket
follows the edge rule on its own ladder, and the report's numbers (mean ± std, the difference to full
finetuning with Welch's p, median step time, largest peak memory) equal those computed here."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

from conftest import REPO
from scipy.stats import ttest_ind

from pipeline.config import load_config
from pipeline.sweep import grid as sweep

spec = importlib.util.spec_from_file_location("study_finetuning", REPO / "tools" / "study_finetuning.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_every_sweep_is_a_valid_command_with_the_protocol(tmp_path):
    for arm in study.ARMS:
        for name, grid, fixed in (study.bracket_sweep(tmp_path, arm, list(study.FIRST[arm])),
                                  study.confirm_sweep(tmp_path, arm, "1e-3"), study.cost_sweep(tmp_path, arm, "1e-3")):
            runs = sweep.plan(grid, fixed)  # load_config on every run: a renamed key fails here
            cfg = load_config(sweep.args(runs[-1], fixed, tmp_path))
            t = cfg.train
            assert cfg.data.seed == 0 and t.global_batch == 128 and t.head_lr == 1e-3 and t.warmup_steps == 0, name
            assert (t.layer_decay, cfg.model.lora.rank) == {"full": (1.0, 0), "decay_0.9": (0.9, 0), "decay_0.75": (
                0.75, 0), "decay_0.65": (0.65, 0), "lora_8": (1.0, 8), "lora_32": (1.0, 32)}[arm]
            if name.startswith("finetuning_costs"):
                assert (cfg.stage, t.max_steps, len(runs)) == ("finetune", study.COST_STEPS, 1)
            else:
                assert (cfg.stage, t.epochs, t.val_every_epochs) == ("eval", 3, 1)
        assert [r.value("seed") for r in runs] == ["0"]
    assert [r.value("seed") for r in sweep.plan(*study.confirm_sweep(tmp_path, "full", "1e-3")[1:])] == ["1", "2", "3"]
    _, grid, fixed = study.cost_sweep(tmp_path, "full_compiled", "1e-3")
    cfg = load_config(sweep.args(sweep.plan(grid, fixed)[0], fixed, tmp_path))
    assert cfg.train.compile and cfg.train.layer_decay == 1.0 and cfg.train.max_steps == study.COST_STEPS
    for arm in study.LARGE_ARMS:  # the costs at ViT-L size: the preset's random weights, not the tiny export
        _, grid, fixed = study.cost_sweep(tmp_path, arm, "1e-3", large=True)
        cfg = load_config(sweep.args(sweep.plan(grid, fixed)[0], fixed, tmp_path))
        assert (cfg.model.arch, cfg.model.pretrained, cfg.train.max_steps, cfg.train.global_batch, cfg.train.chunk_size) \
            == ("vit_large_patch16_dinov3", None, 3, 8, 4)
        assert cfg.model.lora.rank == {"lora_8": 8, "lora_32": 32}.get(arm, 0)


def _run(path: Path, final_val: float | None, test: float = 0.0, map_r: float = 0.0, steps_s=(), peak: float = 0.0,
         log: str = ""):
    """A run's folder: finished (eval/metrics.json, validations rising to final_val) when final_val is
    set; a cost run's logged step times, peak memory and log lines otherwise."""
    (path / "logs").mkdir(parents=True)
    (path / "logs" / "rank0.log").write_text(log)
    lines = [{"step": i, "name": "train/step_s", "value": v} for i, v in enumerate(steps_s)]
    lines += [{"step": 1, "name": "mem/peak_gb", "value": peak}] if steps_s else []
    if final_val is not None:
        (path / "eval").mkdir()
        (path / "eval" / "metrics.json").write_text(json.dumps({"finetuned": {"recall@1": test, "map@r": map_r}}))
        lines += [{"step": 95 * (e + 1), "name": "val/recall@1", "value": final_val - 0.01 * (2 - e)} for e in range(3)]
    (path / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


BRACKET = {"full": {"4e-4": 0.80, "8e-4": 0.85, "1.6e-3": 0.83},             # inside: 8e-4
           "lora_8": {"2e-3": 0.70, "4e-3": 0.72, "8e-3": 0.75, "1.6e-2": 0.74}}  # 8e-3 won at the top edge, then inside
TESTS = {"full": [0.50, 0.52, 0.51], "lora_8": [0.45, 0.47, 0.44]}
COSTS = {"full": ([2.0, 1.0, 3.0, 4.0], 1.5, 2_000_000), "lora_8": ([0.5, 0.7, 0.6], 0.9, 74_240),
         "full_compiled": ([9.0, 1.0, 2.0], 1.7, 2_000_000)}
COMPILING = ("... INFO pipeline.train.compile: train.compile: the first forward without gradients took 12.5 s (compiling "
             "the blocks)\n... INFO pipeline.train.compile: train.compile: the first forward with gradients took 30.0 s "
             "(compiling the blocks)\n")


def test_bracket_plan_and_report(tmp_path, capsys):
    for arm, values in BRACKET.items():
        for lr, value in values.items():
            _run(study.bracket_run(tmp_path, arm, lr), value, value - 0.3)
    state = study.bracket_state(tmp_path)
    assert (state["full"].lr, state["full"].complete, state["full"].inside) == ("8e-4", True, True)
    assert state["lora_8"].tried == ("2e-3", "4e-3", "8e-3", "1.6e-2") and state["lora_8"].lr == "8e-3"
    assert state["decay_0.9"].lr is None and not state["decay_0.9"].complete  # not run
    study.main(["--out", str(tmp_path), "--plan"])
    plan = capsys.readouterr().out
    assert "bracket: decay_0.9 lr 4e-4 seed 0: to run" in plan and "confirm: 3 runs per arm" in plan
    study.main(["--out", str(tmp_path), "--report"])
    text = (tmp_path / "finetuning.md").read_text()
    assert "The bracket is not finished" in text and "| lora_8 | 1.6e-2 | 0.7400 | 0.4400 |  |" in text

    for arm in study.ARMS:  # the other arms: every lr ties, the lowest is chosen (inside: the edge rule ends)
        if arm not in BRACKET:
            for lr in study.FIRST[arm]:
                _run(study.bracket_run(tmp_path, arm, lr), 0.6, 0.3)
    state = study.bracket_state(tmp_path)
    low = state["decay_0.65"]  # a tie at the bottom edge: the next lower value is due
    assert low.tried[0] == study.LADDERS["decay_0.65"][1] and (low.lr, low.complete) == ("4e-4", False)
    for arm in study.ARMS:
        if arm not in BRACKET:
            _run(study.bracket_run(tmp_path, arm, state[arm].tried[0]), 0.5, 0.2)
    state = study.bracket_state(tmp_path)
    assert all(c.complete for c in state.values()) and state["decay_0.9"].lr == "4e-4"
    for arm, tests in TESTS.items():
        lr = state[arm].lr
        for seed, test in zip(study.SEEDS, tests):
            _run(study.confirm_run(tmp_path, arm, lr, seed), 0.8, test, test / 2)
        steps_s, peak, trains = COSTS[arm]
        _run(study.cost_run(tmp_path, arm, lr), None, steps_s=steps_s, peak=peak,
             log=f"... INFO pipeline.train.loop: model: 2,000,000 parameters, {trains:,} of them train (3.71%)\n")
    steps_s, peak, _ = COSTS["full_compiled"]
    _run(study.cost_run(tmp_path, "full_compiled", "8e-4"), None, steps_s=steps_s, peak=peak, log=COMPILING)
    study.main(["--out", str(tmp_path), "--plan"])
    plan = capsys.readouterr().out
    assert "chosen: lora_8 at lr 8e-3\n" in plan and "chosen: decay_0.9 at lr 4e-4 (at the edge" not in plan
    assert "confirm: full lr 8e-4 seed 3: done" in plan and "confirm: decay_0.75 lr 4e-4 seed 1: to run" in plan

    _run(study.cost_run(tmp_path, "lora_32", state["lora_32"].lr, large=True), None, steps_s=[30.0, 20.0, 25.0],
         peak=4.0, log="... model: 300,000,000 parameters, 2,000,000 of them train (0.67%)\n")
    study.main(["--out", str(tmp_path), "--report"])
    assert "| lora_32 | 2,000,000 | 25.0 | 4.00 |\n" in (tmp_path / "finetuning.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in (tmp_path / "finetuning.md").read_text().split("#### Confirmation")[1].split("At ViT-L")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| arm")}
    full, lora = TESTS["full"], TESTS["lora_8"]
    p = ttest_ind(lora, full, equal_var=False).pvalue
    p_map = ttest_ind([t / 2 for t in lora], [t / 2 for t in full], equal_var=False).pvalue
    assert rows["lora_8"] == ["8e-3", f"{statistics.mean(lora):.4f} ± {statistics.stdev(lora):.4f} (3)",
                              f"{statistics.mean(lora) / 2:.4f} ± {statistics.stdev(lora) / 2:.4f} (3)",
                              f"{statistics.mean(lora) - statistics.mean(full):+.4f} (p = {p:.2g})",
                              f"{(statistics.mean(lora) - statistics.mean(full)) / 2:+.4f} (p = {p_map:.2g})",
                              "74,240", "0.600", "0.90"]
    assert rows["full"][3:] == ["", "", "2,000,000", "2.500", "1.50"]  # median of 2, 1, 3, 4
    assert rows["decay_0.75"] == ["4e-4"] + ["n/a"] * 7  # not confirmed yet
    assert ("full with train.compile=true (the same steps, compiled = eager): step s 2.000 against 2.500, peak GB 1.70 "
            "against 1.50; the first forwards spent 42.5 s compiling.") in (tmp_path / "finetuning.md").read_text()
