"""Which finetuning to pick, on data=glyphs (issue 39): full finetuning against layer-wise lr decay
0.9 / 0.75 / 0.65 and LoRA rank 8 / 32, each at its own learning rate, in one resumable command.

    python tools/study_finetuning.py --out runs/study [--jobs 2]
    python tools/study_finetuning.py --out runs/study --plan       print what the command would run now
    python tools/study_finetuning.py --out runs/study --costs      only the costs step (run it alone)
    python tools/study_finetuning.py --out runs/study --report     only (re)write OUT/finetuning.md

1. pretrain  tools/study_glyphs.py's (OUT/pretrain, reused where OUT has it; --pretrained EXPORT starts
             from another export).
2. bracket   seed 0: each arm at the middle three lrs of its ladder (x2 steps). An arm's lr is the one
             with the highest final validation recall@1; tools/study_batch.py's rule: a tie takes the
             lower lr, a run that diverged scores 0, a best at an edge adds the next value of the ladder
             until it is inside or the ladder ends. OUT/finetuning_bracket_<arm>/.
3. confirm   each arm at its lr, seeds 1, 2, 3 (not the bracket's seed, so that the choice does not
             flatter the figures): test recall@1 and MAP@R of the last step. OUT/finetuning_confirm_<arm>/.
4. costs     each arm at its lr for COST_STEPS steps, one run at a time, one thread: the median logged
             train/step_s and the largest mem/peak_gb (the process's resident memory); full finetuning
             also with train.compile=true (its time to compile from the log); then full, decay 0.75 and
             LoRA on DINOv3 ViT-L/16 (LARGE_MODEL: random weights, 3 steps). Its figures mean
             something only when nothing else runs. OUT/finetuning_costs_<arm>/.
5. report    OUT/finetuning.md: BENCHMARKS-ready tables; each arm against full finetuning by Welch's test.

Why a bracket: the glyphs study's 3-epoch protocol trains at train.lr=1e-4, and issue 40's bracket found
batch 128's best lr 8x higher; layer decay lowers the lr of every block below the last, and LoRA's
adapters want a lr of their own, so one shared lr would compare the arms at different distances from
their optimum. Common settings (PROTOCOL): the pretrained tiny ViT, data=glyphs data.seed=0, 3 epochs of
RS@k at batch 128, no warmup, the head at the preset's train.head_lr=1e-3 in every arm (the head is the
same in all of them), validation after every epoch.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.run_dir import RunDir
from pipeline.tracking import read_metrics, series


def _tool(name: str):
    """A script of tools/ loaded by path (tools/ on sys.path would make its sweep.py the top-level `sweep`)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


batch = _tool("study_batch")    # the bracket's rule, the scheduling of runs, the statistics
glyphs = batch.study_glyphs     # the pretraining and the benchmark (study_batch loaded it already)

PROTOCOL = [*glyphs.BENCHMARK, "stage=eval", "eval.models=[finetuned]", "train.epochs=3", "train.warmup_steps=0",
            "train.val_every=0", "train.val_every_epochs=1"]
COST_STEPS = 40
COST_PROTOCOL = [*glyphs.BENCHMARK, "stage=finetune", f"train.max_steps={COST_STEPS}", "train.warmup_steps=0",
                 "train.val_every=0"]
FULL = "full"
ARMS = {FULL: ["train.layer_decay=1.0"], "decay_0.9": ["train.layer_decay=0.9"],
        "decay_0.75": ["train.layer_decay=0.75"], "decay_0.65": ["train.layer_decay=0.65"],
        "lora_8": ["model.lora.rank=8"], "lora_32": ["model.lora.rank=32"]}
# The costs at the size of the models the pipeline is for: DINOv3 ViT-L/16 (random weights, 224 px; the
# glyphs scaled up), a few steps of batch 8 in chunks of 4. Layer decay costs what full finetuning does.
LARGE_MODEL = ["model=dinov3_vitl16", "train.global_batch=8", "train.chunk_size=4", "train.max_steps=3"]
LARGE_ARMS = ("full", "decay_0.75", "lora_8", "lora_32")
# Costs only: train.compile changes no result (compiled = eager, tests/test_compile.py), only the time.
COMPILED = {"full_compiled": (FULL, ["train.compile=true"])}  # name: (the arm whose lr it takes, words added)
# Each arm's lr ladder (x2 steps); the bracket starts at FIRST, the middle three.
BACKBONE = ("1e-4", "2e-4", "4e-4", "8e-4", "1.6e-3", "3.2e-3", "6.4e-3", "1.28e-2")
ADAPTERS = ("2.5e-4", "5e-4", "1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2")
LADDERS = {arm: ADAPTERS if arm.startswith("lora") else BACKBONE for arm in ARMS}
FIRST = {arm: ("2e-3", "4e-3", "8e-3") if arm.startswith("lora") else ("4e-4", "8e-4", "1.6e-3") for arm in ARMS}
BRACKET_SEED, SEEDS = 0, (1, 2, 3)


def bracket_name(arm: str) -> str:
    return f"finetuning_bracket_{arm}"


def confirm_name(arm: str) -> str:
    return f"finetuning_confirm_{arm}"


def cost_name(arm: str, large: bool = False) -> str:
    return f"finetuning_costs_{'vitl16_' if large else ''}{arm}"


def fixed_words(protocol: list[str], start: Path, arm: str) -> list[str]:
    return [*protocol, f"model.pretrained={start}", *ARMS[arm]]


def bracket_sweep(start: Path, arm: str, lrs: list[str]) -> tuple[str, list[str], list[str]]:
    return bracket_name(arm), [f"train.lr={','.join(lrs)}", f"seed={BRACKET_SEED}"], fixed_words(PROTOCOL, start, arm)


def confirm_sweep(start: Path, arm: str, lr: str) -> tuple[str, list[str], list[str]]:
    return (confirm_name(arm), [f"train.lr={lr}", "seed=" + ",".join(map(str, SEEDS))],
            fixed_words(PROTOCOL, start, arm))


def cost_sweep(start: Path, arm: str, lr: str, large: bool = False) -> tuple[str, list[str], list[str]]:
    """An arm of ARMS, or of COMPILED (its base arm's words and its own); large: on LARGE_MODEL."""
    base, extra = COMPILED.get(arm, (arm, []))
    fixed = ([*COST_PROTOCOL, *LARGE_MODEL, *ARMS[base]] if large else fixed_words(COST_PROTOCOL, start, base))
    return cost_name(arm, large), [f"train.lr={lr}", f"seed={BRACKET_SEED}"], [*fixed, *extra]


def bracket_run(out: Path, arm: str, lr: str) -> Path:
    return batch.run_dir(out, bracket_name(arm), [f"train.lr={lr}", f"seed={BRACKET_SEED}"])


def confirm_run(out: Path, arm: str, lr: str, seed: int) -> Path:
    return batch.run_dir(out, confirm_name(arm), [f"train.lr={lr}", f"seed={seed}"])


def cost_run(out: Path, arm: str, lr: str, large: bool = False) -> Path:
    return batch.run_dir(out, cost_name(arm, large), [f"train.lr={lr}", f"seed={BRACKET_SEED}"])


def bracket_state(out: Path) -> dict[str, batch.Choice]:
    """Each arm's bracket as far as the finished runs decide it, replayed from the results (a resumed
    study finds the same)."""
    state = {}
    for arm in ARMS:
        lrs = list(FIRST[arm])
        while True:
            choice = batch.choose({lr: batch.final_validation(bracket_run(out, arm, lr)) for lr in lrs}, LADDERS[arm])
            if choice.next_lr is None:
                break
            lrs.append(choice.next_lr)
        state[arm] = choice
    return state


def start_of(out: Path, pretrained: Path | None) -> Path:
    if pretrained is not None:
        return pretrained.resolve()
    glyphs.pipeline(out / "pretrain", "stage=all", *glyphs.PRETRAIN)
    return out / "pretrain" / "export"


def run_study(out: Path, start: Path, jobs: int) -> None:
    while True:  # the bracket, one more value per edge best each round
        state = bracket_state(out)
        if all(c.complete for c in state.values()):
            break
        batch.run_phase(out, [bracket_sweep(start, arm, [*c.tried, *([c.next_lr] if c.next_lr else [])])
                              for arm, c in state.items() if not c.complete], jobs)
        if bracket_state(out) == state:
            sys.exit(f"study: bracket runs failed (see the sweep.log of each run in {out}/finetuning_bracket_*); "
                     "run the same command again to retry them")
    print("study: chosen lrs: " + ", ".join(f"{arm} at {c.lr}" for arm, c in state.items()), flush=True)
    batch.run_phase(out, [confirm_sweep(start, arm, c.lr) for arm, c in state.items()], jobs)


def run_costs(out: Path, start: Path) -> None:
    state = bracket_state(out)
    if not all(c.complete for c in state.values()):
        sys.exit("study: the bracket is not finished, so no arm has its lr yet: run the study first")
    lrs = {**{arm: c.lr for arm, c in state.items()}, **{arm: state[base].lr for arm, (base, _) in COMPILED.items()}}
    batch.run_phase(out, [cost_sweep(start, arm, lr) for arm, lr in lrs.items()] +
                    [cost_sweep(start, arm, lrs[arm], large=True) for arm in LARGE_ARMS], jobs=1)


def plan_lines(out: Path) -> list[str]:
    state = bracket_state(out)
    lines = [f"pretrain: {'done' if (out / 'pretrain' / 'export').is_dir() else 'to run (about 9 min)'}"]
    for arm, c in state.items():
        for lr in [*c.tried, *([c.next_lr] if c.next_lr else [])]:
            path = bracket_run(out, arm, lr)
            lines.append(f"bracket: {arm} lr {lr} seed {BRACKET_SEED}: {'done' if batch.done(path) else 'to run'} ({path})")
    if not all(c.complete for c in state.values()):
        return lines + [f"confirm: {len(SEEDS)} runs per arm, at the lrs the bracket chooses, after it"]
    for arm, c in state.items():
        lines.append(f"chosen: {arm} at lr {c.lr}" + ("" if c.inside else " (at the edge of its ladder)"))
        lines += [f"confirm: {arm} lr {c.lr} seed {s}: {'done' if batch.done(confirm_run(out, arm, c.lr, s)) else 'to run'}"
                  for s in SEEDS]
    return lines


# ---- the report ------------------------------------------------------------------------------------

TRAINS = re.compile(r"model: ([\d,]+) parameters, ([\d,]+) of them train")
COMPILING = re.compile(r"train.compile: the first forward (?:without|with) gradients took ([\d.]+) s")


def cost(path: Path) -> dict[str, float | None]:
    """A cost run's median train/step_s and largest mem/peak_gb (logs/metrics.jsonl), and from its log
    the parameters that train and the seconds the first forwards spent compiling."""
    logs = RunDir(path).logs
    found = {"step_s": None, "peak_gb": None, "trains": None, "compile_s": None}
    if (logs / "metrics.jsonl").is_file():
        records = read_metrics(logs / "metrics.jsonl")
        steps, peaks = series(records, "train/step_s")[1], series(records, "mem/peak_gb")[1]
        found.update(step_s=statistics.median(steps) if steps else None, peak_gb=max(peaks) if peaks else None)
    if (logs / "rank0.log").is_file():
        text = (logs / "rank0.log").read_text(errors="replace")
        counts = TRAINS.findall(text)
        found["trains"] = int(counts[-1][1].replace(",", "")) if counts else None
        compiling = [float(v) for v in COMPILING.findall(text)]
        found["compile_s"] = sum(compiling) if compiling else None
    return found


def number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def report(out: Path) -> str:
    state = bracket_state(out)
    lines = ["### Results", "", (f"Made by `python tools/study_finetuning.py --out {out}` (and `--costs`). Cells: "
             "mean ± sample std (n runs)."), "", "#### The learning-rate bracket (seed 0)", "",
             "| arm | lr | final val recall@1 | test recall@1 | |", "|---|---|---|---|---|"]
    for arm, c in state.items():
        for lr in c.tried:
            path = bracket_run(out, arm, lr)
            m = batch.metrics_of(path) if batch.done(path) else {}
            mark = ("**chosen**" + ("" if c.inside else ", at the edge")) if lr == c.lr and c.complete else ""
            if batch.diverged(path):
                m, mark = {"final val/recall@1": 0.0}, "diverged (scored 0)"
            lines.append(f"| {arm} | {lr} | {number(m.get('final val/recall@1'), 4)} | {number(m.get('recall@1'), 4)} "
                         f"| {mark} |")
    lines.append("")
    if not all(c.complete for c in state.values()):
        return "\n".join(lines + ["The bracket is not finished: no lr is chosen yet.", ""])
    found = {arm: [batch.metrics_of(p) for p in (confirm_run(out, arm, c.lr, s) for s in SEEDS) if batch.done(p)]
             for arm, c in state.items()}
    lines += [f"#### Confirmation (seeds {', '.join(map(str, SEEDS))}; the last step's weights on the test classes)", "",
              "| arm | lr | test recall@1 | test map@r | recall@1 - full | map@r - full | trains | step s | peak GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    full = found[FULL]
    for arm, metrics in found.items():
        recall, map_r = ([m[k] for m in metrics] for k in ("recall@1", "map@r"))
        against = ["", ""] if arm == FULL else [batch.fmt_diff(*batch.welch([m[k] for m in full], values))
                                                for k, values in (("recall@1", recall), ("map@r", map_r))]
        c = cost(cost_run(out, arm, state[arm].lr))
        lines.append(f"| {arm} | {state[arm].lr} | {batch.fmt(recall)} | {batch.fmt(map_r)} | {' | '.join(against)} | "
                     f"{count(c['trains'])} | {number(c['step_s'], 3)} | "
                     f"{number(c['peak_gb'], 2)} |")
    lines += ["", (f"Trains: the parameters that train (the run's log). Step s and peak GB: `--costs`, each arm alone "
              f"for {COST_STEPS} steps at its lr, one thread (the median of the logged train/step_s, the largest "
              "mem/peak_gb: the process's resident memory)."), ""]
    for arm, (base, extra) in COMPILED.items():
        c, eager = cost(cost_run(out, arm, state[base].lr)), cost(cost_run(out, base, state[base].lr))
        lines.append(f"{base} with {' '.join(extra)} (the same steps, compiled = eager): step s "
                     f"{number(c['step_s'], 3)} against {number(eager['step_s'], 3)}, peak GB {number(c['peak_gb'], 2)} "
                     f"against {number(eager['peak_gb'], 2)}; the first forwards spent {number(c['compile_s'], 1)} s "
                     "compiling.")
    lines += ["", f"At ViT-L size (`{' '.join(LARGE_MODEL)}`, one thread, the same measures):", "",
              "| arm | trains | step s | peak GB |", "|---|---|---|---|"]
    for arm in LARGE_ARMS:
        c = cost(cost_run(out, arm, state[arm].lr, large=True))
        lines.append(f"| {arm} | {count(c['trains'])} | {number(c['step_s'], 1)} | {number(c['peak_gb'], 2)} |")
    return "\n".join(lines + [""])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the study's folder (shared with study_glyphs.py)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one thread each)")
    parser.add_argument("--pretrained", type=Path, help="an export to start from (default: the pretraining in OUT)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the runs the command would do now; run nothing")
    mode.add_argument("--costs", action="store_true", help="only measure each arm's step time and memory, alone")
    mode.add_argument("--report", action="store_true", help="only write the report of what has run")
    options = parser.parse_args(argv)
    out = options.out.resolve()
    if options.plan:
        print("\n".join(plan_lines(out)))
        return 0
    if options.costs:
        run_costs(out, start_of(out, options.pretrained))
    elif not options.report:
        run_study(out, start_of(out, options.pretrained), options.jobs)
    (out / "finetuning.md").write_text(report(out))
    print(f"study: report in {out / 'finetuning.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
