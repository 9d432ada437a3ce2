"""A fair test of the large batch (issue 40): RS@k at global batch 128 against 1,024, each at its own
learning rate, in one resumable command. Protocol and decision rule: BENCHMARKS.md, "A fair test of
the large batch (issue 40)", written before any run.

    python tools/study_batch.py --out runs/study [--jobs 2]
    python tools/study_batch.py --out runs/study --plan      print the runs the command would do; run nothing
    python tools/study_batch.py --out runs/study --report    only (re)write OUT/batch.md and OUT/batch.png

1. pretrain, frozen  tools/study_glyphs.py's steps 1 and 2 (the same folders: reused where OUT has them)
2. bracket   seed 0, loss=rsk: batch 128 at lr 5e-5, 1e-4, 2e-4; batch 1,024 at 1e-4, 2.8e-4, 8e-4
             (x1, x sqrt 8, x8). Each batch's lr is the one with the highest final validation recall@1
             (a tie: the lower lr; a run that diverged scores 0); one at the edge of the values tried adds the next value of its
             ladder (LADDERS: two more each way at most), until the best is inside or the ladder ends.
             OUT/batch_bracket_<B>/, a sweep folder each.
3. confirm   each batch at its chosen lr, loss=rsk and rsk_simix, seeds 1, 2, 3: OUT/batch_confirm_<B>/.
4. report    OUT/batch.md (BENCHMARKS-ready tables, Welch's test, the pre-registered decision applied
             to the numbers) and OUT/batch.png (validation recall@1 against steps and against images).

Common settings (PROTOCOL): the pretrained tiny ViT, data=glyphs data.seed=0, 15 epochs, cosine with
a warmup of 5% of each run's steps (train.warmup_fraction), the head at the backbone's lr
(train.head_lr=null, the authors' --fc_lr_mul 0), the query in its positives' ranks (the authors'
losses.py), validation after every epoch, test on the last step's weights.

Runs go --jobs at a time across the two batches' folders, one thread each; finished runs are skipped
(the runner's markers), so after a crash or a kill the same command carries on.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.sweep import grid as sweep  # noqa: E402
from pipeline.sweep import summary as sweep_summary  # noqa: E402


def _tool(name: str):
    """A script of tools/ loaded by path (tools/ on sys.path would make its sweep.py the top-level `sweep`)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study_glyphs = _tool("study_glyphs")  # the pretraining, the benchmark and the frozen run
sweep_tool = _tool("sweep")  # tools/sweep.py: starting a run, sharing shards

EPOCHS = 15
PROTOCOL = [*study_glyphs.BENCHMARK, "stage=eval", "eval.models=[finetuned]", f"train.epochs={EPOCHS}",
            "train.warmup_fraction=0.05", "train.head_lr=null", "train.include_query_in_rank=true",
            "train.val_every=0", "train.val_every_epochs=1"]
SMALL, LARGE = 128, 1024
SAMPLES_PER_CLASS = 4       # the P x K sampler's K (train.samples_per_class's default)
# Each batch's lr ladder: the pre-registered bracket is the middle three; an edge best takes the next.
LADDERS = {SMALL: ("1.25e-5", "2.5e-5", "5e-5", "1e-4", "2e-4", "4e-4", "8e-4"),            # x2
           LARGE: ("1.25e-5", "3.5e-5", "1e-4", "2.8e-4", "8e-4", "2.3e-3", "6.4e-3")}     # x sqrt 8
FIRST = {SMALL: ("5e-5", "1e-4", "2e-4"), LARGE: ("1e-4", "2.8e-4", "8e-4")}
BRACKET_SEED, SEEDS, LOSSES = 0, (1, 2, 3), ("rsk", "rsk_simix")
K = 16                      # RS@k's largest k: positives ranked beyond it get almost no gradient
MARGIN, ALPHA = 0.005, 0.05  # the decision rule's smallest effect and its p-value threshold
VAL = "val/recall@1"


def bracket_name(batch: int) -> str:
    return f"batch_bracket_{batch}"


def confirm_name(batch: int) -> str:
    return f"batch_confirm_{batch}"


def fixed_words(start: Path, batch: int, *extra: str) -> list[str]:
    return [*PROTOCOL, f"model.pretrained={start}", f"train.global_batch={batch}", *extra]


def bracket_sweep(start: Path, batch: int, lrs: list[str]) -> tuple[str, list[str], list[str]]:
    return bracket_name(batch), [f"train.lr={','.join(lrs)}", f"seed={BRACKET_SEED}"], fixed_words(start, batch, "loss=rsk")


def confirm_sweep(start: Path, batch: int, lr: str) -> tuple[str, list[str], list[str]]:
    return (confirm_name(batch), [f"train.lr={lr}", f"loss={','.join(LOSSES)}", "seed=" + ",".join(map(str, SEEDS))],
            fixed_words(start, batch))


# ---- what a run left on disk ----------------------------------------------------------------------

def done(run_dir: Path) -> bool:
    """The run's eval wrote its metrics: the last stage of stage=eval (the scheduling itself uses the
    runner's completion markers, pipeline.sweep.grid.finished)."""
    return (run_dir / "eval" / "metrics.json").is_file()


def validation_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, validation recall@1) from logs/metrics.jsonl, one value per step (a resumed run's repeat:
    the last written), in step order."""
    path = run_dir / "logs" / "metrics.jsonl"
    by_step: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                if record["name"] == VAL:
                    by_step[int(record["step"])] = float(record["value"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def diverged(run_dir: Path) -> bool:
    """The run failed on non-finite embeddings (pipeline/eval/metrics.py's line): its lr is too high."""
    log = run_dir / "sweep.log"
    return not done(run_dir) and log.is_file() and "has diverged" in log.read_text(errors="replace")


def final_validation(run_dir: Path) -> float | None:
    """The last validation recall@1 of a finished run; 0 for a run that diverged; None otherwise."""
    if diverged(run_dir):
        return 0.0
    _, values = validation_curve(run_dir)
    return values[-1] if done(run_dir) and values else None


def run_dir(out: Path, name: str, words: list[str]) -> Path:
    return out / name / sweep.Run(tuple(words)).name


def bracket_run(out: Path, batch: int, lr: str) -> Path:
    return run_dir(out, bracket_name(batch), [f"train.lr={lr}", f"seed={BRACKET_SEED}"])


def confirm_run(out: Path, batch: int, lr: str, loss: str, seed: int) -> Path:
    return run_dir(out, confirm_name(batch), [f"train.lr={lr}", f"loss={loss}", f"seed={seed}"])


# ---- the choice of each batch's learning rate -----------------------------------------------------

@dataclass(frozen=True)
class Choice:
    lr: str | None          # the best lr of the finished runs (None: none finished)
    tried: tuple[str, ...]  # the lrs of the bracket, in ladder order
    complete: bool          # every tried lr finished and no further value is due
    next_lr: str | None     # the ladder value the bracket adds next (the best at an edge)

    @property
    def inside(self) -> bool:
        """The chosen lr has a tried value on each side (the decision rule's 'inside its grid')."""
        return self.lr is not None and self.tried[0] != self.lr != self.tried[-1]


def choose(finals: dict[str, float | None], ladder: tuple[str, ...]) -> Choice:
    """The best lr by final validation recall@1 (ties: the lower), and the next value the bracket needs.
    finals: every tried lr -> its run's final validation recall@1 (None: not finished); ladder: the lrs
    the bracket may try, in increasing order."""
    tried = tuple(sorted(finals, key=ladder.index))
    scored = {lr: v for lr, v in finals.items() if v is not None}
    if not scored:
        return Choice(None, tried, False, None)
    best = max(scored, key=lambda lr: (scored[lr], -float(lr)))
    next_lr = None
    if len(scored) == len(tried):
        at = ladder.index(best)
        if best == tried[0] and at > 0:
            next_lr = ladder[at - 1]
        elif best == tried[-1] and at < len(ladder) - 1:
            next_lr = ladder[at + 1]
    return Choice(best, tried, len(scored) == len(tried) and next_lr is None, next_lr)


def bracket_state(out: Path) -> dict[int, Choice]:
    """Each batch's bracket as far as the finished runs decide it: the first three lrs, plus each next
    value that an edge best called for, replayed from the results (so a resumed study finds the same)."""
    state = {}
    for batch in (SMALL, LARGE):
        lrs = list(FIRST[batch])
        while True:
            choice = choose({lr: final_validation(bracket_run(out, batch, lr)) for lr in lrs}, LADDERS[batch])
            if choice.next_lr is None:
                break
            lrs.append(choice.next_lr)
        state[batch] = choice
    return state


# ---- running ---------------------------------------------------------------------------------------

def interleave(groups: list[list]) -> list:
    """a1 b1 a2 b2 ...: the batches' runs side by side, so a study stopped early holds matched runs."""
    order = []
    for i in range(max((len(g) for g in groups), default=0)):
        order += [g[i] for g in groups if i < len(g)]
    return order


def run_phase(out: Path, sweeps: list[tuple[str, list[str], list[str]]], jobs: int) -> None:
    """Plan each sweep folder (its sweep.json), then run every unfinished run of all of them, `jobs` at a
    time, one thread each; then each folder's summary.{json,md}."""
    groups = []
    for name, grid, fixed in sweeps:
        folder = out / name
        runs = sweep.plan(grid, fixed)
        folder.mkdir(parents=True, exist_ok=True)
        sweep.save_plan(folder, grid, fixed, runs)
        todo = sweep.idle([r for r in runs if not diverged(folder / r.name) and not sweep.finished(r, fixed, folder)],
                          folder, print)
        print(f"study: {name}: {len(runs)} runs, {len(runs) - len(todo)} finished or running elsewhere", flush=True)
        sweep_tool.share_shards(runs, todo, fixed, folder)
        groups.append([(r, fixed, folder) for r in todo])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    todo, running = interleave(groups), {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run, fixed, folder = todo.pop(0)
                running[folder / run.name] = (sweep_tool.start(run, fixed, folder, env), time.monotonic())
                print(f"study: started {folder.name}/{run.name}", flush=True)
            time.sleep(1)
            for path, (proc, began) in list(running.items()):
                if proc.poll() is not None:
                    del running[path]
                    print(f"study: {path.parent.name}/{path.name} " + ("finished" if proc.returncode == 0 else
                          f"FAILED (exit {proc.returncode}); see {path / 'sweep.log'}") +
                          f" in {time.monotonic() - began:.0f} s", flush=True)
    finally:
        for proc, _ in running.values():  # interrupted: the runs checkpoint and stop, resumed next time
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
    for name, _, _ in sweeps:
        sweep_summary.aggregate(out / name)


def run_study(out: Path, jobs: int) -> None:
    study_glyphs.pipeline(out / "pretrain", "stage=all", *study_glyphs.PRETRAIN)
    start = out / "pretrain" / "export"
    study_glyphs.pipeline(out / "frozen", "stage=eval", "eval.models=[frozen]", *study_glyphs.BENCHMARK,
                          f"model.pretrained={start}")
    while True:  # the bracket, one more value per edge best each round
        state = bracket_state(out)
        if all(c.complete for c in state.values()):
            break
        before = state
        run_phase(out, [bracket_sweep(start, b, [*c.tried, *([c.next_lr] if c.next_lr else [])])
                        for b, c in state.items() if not c.complete], jobs)
        if bracket_state(out) == before:
            sys.exit(f"study: bracket runs failed (see the sweep.log of each run in {out}/batch_bracket_*); "
                     "run the same command again to retry them")
    print("study: chosen lrs: " + ", ".join(f"batch {b} at {c.lr}" for b, c in state.items()), flush=True)
    run_phase(out, [confirm_sweep(start, b, c.lr) for b, c in state.items()], jobs)


def plan_lines(out: Path) -> list[str]:
    """What the command would run now (--plan), from what OUT holds."""
    state = bracket_state(out)
    lines = [f"pretrain: {'done' if (out / 'pretrain' / 'export').is_dir() else 'to run (about 9 min)'}",
             f"frozen: {'done' if done(out / 'frozen') else 'to run'}"]
    for batch, c in state.items():
        lrs = [*c.tried, *([c.next_lr] if c.next_lr else [])]
        for lr in lrs:
            path = bracket_run(out, batch, lr)
            lines.append(f"bracket: batch {batch} lr {lr} seed {BRACKET_SEED}: {'done' if done(path) else 'to run'} ({path})")
    if all(c.complete for c in state.values()):
        for batch, c in state.items():
            lines.append(f"chosen: batch {batch} at lr {c.lr}" + ("" if c.inside else " (at the edge of its ladder)"))
            for loss in LOSSES:
                for seed in SEEDS:
                    path = confirm_run(out, batch, c.lr, loss, seed)
                    lines.append(f"confirm: batch {batch} lr {c.lr} loss={loss} seed {seed}: "
                                 f"{'done' if done(path) else 'to run'} ({path})")
    else:
        lines.append(f"confirm: {len(LOSSES) * len(SEEDS)} runs per batch, at the lrs the bracket chooses, after it")
    return lines


# ---- the report ------------------------------------------------------------------------------------

def metrics_of(path: Path) -> dict[str, float]:
    """A finished run's metrics by the sweeps' names (recall@1, map@r, ...) and its final validation."""
    found = sweep_summary.run_metrics(path)
    found["final val/recall@1"] = final_validation(path)
    return found


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """(mean(b) - mean(a), Welch's two-sided p; None without two values on each side)."""
    from scipy.stats import ttest_ind

    if not a or not b:
        return None, None
    diff = sum(b) / len(b) - sum(a) / len(a)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, float(ttest_ind(b, a, equal_var=False).pvalue)


def decide(diff: float | None, p: float | None, inside: bool, complete: bool) -> str:
    """The pre-registered rule (BENCHMARKS.md), on 1,024 minus 128."""
    if not complete or diff is None or p is None:
        return "not decided: the confirmation is incomplete (seeds 1-3 of both arms are needed)"
    if diff >= MARGIN and p < ALPHA:
        return "reproduced: the large batch is better"
    if diff <= -MARGIN and p < ALPHA and inside:
        return "refuted at this scale: the large batch is worse"
    if diff <= -MARGIN and p < ALPHA:
        return "no detectable effect (the large batch is worse, but a chosen lr lies at the edge of its grid)"
    return "no detectable effect"


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    stats = sweep_summary.statistics(values)
    return f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats["std"] is not None else "") + f" ({stats['n']})"


def fmt_diff(diff: float | None, p: float | None) -> str:
    return "n/a" if diff is None else f"{diff:+.4f}" + ("" if p is None else f" (p = {p:.2g})")


def mean_curve(paths: list[Path]) -> tuple[list[int], list[float]]:
    """The mean validation curve over runs, at the steps every run reached."""
    curves = [validation_curve(p) for p in paths]
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], []
    common = sorted(set.intersection(*(set(s) for s, _ in curves)))
    return common, [sum(dict(zip(*c))[s] for c in curves) / len(curves) for s in common]


def at(curve: tuple[list[int], list[float]], x: float, scale: int = 1) -> float | None:
    """The curve's value at x (steps x scale), linear between validations; None outside them."""
    import numpy as np

    xs = [s * scale for s in curve[0]]
    if not xs or not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, curve[1]))


def shares(out: Path, batch: int, paths: dict[int, Path]) -> tuple[list[float], list[float]]:
    """(at the start, at the end): the share of (query, positive) pairs beyond k = 16 in the first epoch's
    batches of each seed's run, with the frozen encoder and with the run's final weights (train split)."""
    import numpy as np

    from pipeline.data.sampler import PKSampler
    from pipeline.eval.positives_beyond_k import share_beyond_k

    frozen = out / "frozen" / "embeddings" / "frozen" / "train.npz"
    start, end = [], []
    for seed, path in paths.items():
        final = path / "embeddings" / "finetuned" / "train.npz"
        if not (frozen.is_file() and final.is_file()):
            continue
        first = np.load(frozen)
        sampler = PKSampler(first["labels"], batch, SAMPLES_PER_CLASS, seed)
        batches = [sampler.batch(step) for step in range(max(1, len(first["labels"]) // batch))]
        last = np.load(final)
        if not np.array_equal(first["labels"], last["labels"]):
            raise SystemExit(f"study: {final} and {frozen} hold different training images")
        start.append(share_beyond_k(first["embeddings"], first["labels"], batches, K, include_query=True))
        end.append(share_beyond_k(last["embeddings"], last["labels"], batches, K, include_query=True))
    return start, end


def figure(arms: dict[str, tuple[int, list[Path], bool]], path: Path) -> None:
    """Validation recall@1 against optimizer steps and against images seen; confirmation arms: the
    mean over their seeds (thick), bracket arms: seed 0 (thin)."""
    from pipeline.eval.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (label, (batch, paths, main)) in enumerate(arms.items()):
        steps, values = mean_curve(paths)
        if not steps:
            continue
        if main:  # the batch by colour, SiMix dashed
            style = {"lw": 2, "marker": "o", "ms": 3, "color": "C0" if batch == SMALL else "C3",
                     "ls": "--" if "simix" in label else "-"}
        else:
            style = {"lw": 0.8, "alpha": 0.7, "color": f"C{(i + 4) % 10}", "ls": ":" if batch == SMALL else "-."}
        for ax, scale in zip(axes, (1, batch)):
            ax.plot([s * scale for s in steps], values, label=label, **style)
    for ax, xlabel in zip(axes, ("optimizer steps", "images seen")):
        ax.set(xscale="log", xlabel=xlabel, ylabel="validation recall@1")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def report(out: Path) -> str:
    state = bracket_state(out)
    lines = ["### Results", "",
             (f"Made by `python tools/study_batch.py --out {out}`: the protocol and rule pre-registered above. "
             "Cells: mean ± sample std (n runs)."), "", "#### The learning-rate bracket (seed 0, loss=rsk)", "",
             "| batch | lr | final val recall@1 | best val recall@1 | test recall@1 | test map@r | |",
             "|---|---|---|---|---|---|---|"]
    for batch, c in state.items():
        for lr in c.tried:
            path = bracket_run(out, batch, lr)
            m = metrics_of(path) if done(path) else {}
            mark = ("**chosen**" + ("" if c.inside else ", at the edge")) if lr == c.lr and c.complete else ""
            lines.append(f"| {batch} | {lr} | " + " | ".join(
                "n/a" if m.get(k) is None else f"{m[k]:.4f}"
                for k in ("final val/recall@1", "best val/recall@1", "recall@1", "map@r")) + f" | {mark} |")
    lines.append("")
    if not all(c.complete for c in state.values()):
        return "\n".join(lines + ["The bracket is not finished: no lr is chosen yet.", ""])
    frozen = out / "frozen" / "eval" / "metrics.json"
    if frozen.is_file():
        lines += [(f"The frozen encoder (the start of every run): test recall@1 "
                  f"{json.loads(frozen.read_text())['frozen']['recall@1']:.4f}."), ""]
    lr = {b: c.lr for b, c in state.items()}
    ratio = float(lr[LARGE]) / float(lr[SMALL])
    lines += [(f"Chosen: batch {SMALL} at {lr[SMALL]}, batch {LARGE} at {lr[LARGE]}: the large batch's lr is "
              f"{ratio:.2g} x the small one's (square-root scaling: {math.sqrt(LARGE / SMALL):.2g} x; linear: "
              f"{LARGE // SMALL} x; the ladders' steps are x2 and x2.8)."), ""]
    runs = {(loss, b): {s: confirm_run(out, b, lr[b], loss, s) for s in SEEDS} for loss in LOSSES for b in (SMALL, LARGE)}
    found = {arm: {s: metrics_of(p) for s, p in paths.items() if done(p)} for arm, paths in runs.items()}
    lines += ["#### Confirmation (seeds 1, 2, 3; the last step's weights on the 1,108 test classes)", "",
              "| loss | batch | lr | test recall@1 | test map@r | final val recall@1 | beyond k=16, start | beyond k=16, end |",
              "|---|---|---|---|---|---|---|---|"]
    share_rows = {}
    for (loss, b), metrics in found.items():
        start, end = shares(out, b, {s: runs[loss, b][s] for s in metrics})
        share_rows[loss, b] = (start, end)
        lines.append(f"| {loss} | {b} | {lr[b]} | " + " | ".join(
            fmt([m[k] for m in metrics.values() if m.get(k) is not None])
            for k in ("recall@1", "map@r", "final val/recall@1")) + f" | {fmt(start)} | {fmt(end)} |")
    lines += ["", ("\"Beyond k=16\": the share of (query, positive) pairs of the seed's first-epoch training batches "
              "whose positive ranks beyond 16 (the query counted, as in training), with the frozen encoder (start) "
              "and the final weights (end): pipeline/eval/positives_beyond_k.py."), "",
              f"#### The decision ({LARGE:,} minus {SMALL}, Welch's two-sided test)", ""]
    inside = all(c.inside for c in state.values())
    for loss, role in (("rsk", "primary"), ("rsk_simix", "the same pair with SiMix")):
        small, large = found[loss, SMALL], found[loss, LARGE]
        complete = len(small) == len(large) == len(SEEDS)
        d, p = welch([m["recall@1"] for m in small.values()], [m["recall@1"] for m in large.values()])
        dm, pm = welch([m["map@r"] for m in small.values()], [m["map@r"] for m in large.values()])
        lines.append(f"- **{loss}** ({role}): test recall@1 {fmt_diff(d, p)} -> **{decide(d, p, inside, complete)}**; "
                     f"MAP@R {fmt_diff(dm, pm)}.")
    lines += ["", f"Both chosen lrs inside their grids: {'yes' if inside else 'no'}.", "",
              "#### Equal steps and equal images (validation recall@1 from the curves, mean over seeds)", "",
              (f"| loss | batch {LARGE:,} at its last step | batch {SMALL} at the same step | "
              f"batch {SMALL} at the same images | batch {SMALL} at its last step |"), "|---|---|---|---|---|"]
    for loss in LOSSES:
        big, small = mean_curve(list(runs[loss, LARGE].values())), mean_curve(list(runs[loss, SMALL].values()))
        if not big[0] or not small[0]:
            lines.append(f"| {loss} | n/a | n/a | n/a | n/a |")
            continue
        last = big[0][-1]
        cells = [big[1][-1], at(small, last), at(small, last * LARGE, SMALL), small[1][-1]]
        lines.append(f"| {loss} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |")
    arms = {f"{loss} batch {b} lr {lr[b]} (seeds 1-3)": (b, list(runs[loss, b].values()), True)
            for loss in LOSSES for b in (SMALL, LARGE)}
    arms.update({f"bracket: batch {b} lr {x} (seed 0)": (b, [bracket_run(out, b, x)], False)
                 for b, c in state.items() for x in c.tried})
    figure(arms, out / "batch.png")
    return "\n".join(lines + ["", "![validation recall@1 against steps and images](batch.png)", ""])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the study's folder (shared with study_glyphs.py)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one thread each)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the runs the command would do now; run nothing")
    mode.add_argument("--report", action="store_true", help="only write the report of what has run")
    options = parser.parse_args(argv)
    out = options.out.resolve()
    if options.plan:
        print("\n".join(plan_lines(out)))
        return 0
    if not options.report:
        run_study(out, options.jobs)
    (out / "batch.md").write_text(report(out))
    print(f"study: report in {out / 'batch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
