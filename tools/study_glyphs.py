"""The glyphs study: the seed papers' comparisons on data=glyphs, in one command (BENCHMARKS.md).

    python tools/study_glyphs.py --out runs/study [--jobs 2] [--seeds 3]
    python tools/study_glyphs.py --out runs/study --report     only (re)write the report
    python tools/study_glyphs.py --out runs/study --convergence   the two findings at convergence (below)

1. pretrain  the tiny ViT on the characters that 4 to 7 fonts draw (multi-similarity loss), classes
             disjoint from the benchmark's (8 fonts or more): the stand-in for the ImageNet
             weights the papers start from. From random weights RS@k makes the tiny ViT worse on
             glyphs (BENCHMARKS.md): it needs an encoder that already ranks, as in the papers.
2. frozen    that encoder on the benchmark's test classes, untouched: the baseline.
3. sweeps    from it, one protocol for every method (Roth et al.'s fairness: the same encoder,
             images seen, sampler, augmentation, optimiser and schedule), each over --seeds seeds,
             each a tools/sweep.py folder in OUT:
               losses         every other loss preset at batch 128
               rsk            RS@k and RS@k + SiMix at global batch 128, 512 and 2,048 (two-pass,
                              the same chunk, the same number of images: train.epochs)
               query_in_rank  RS@k with the query counted in every positive's rank (the authors' code)
               rho            the margin loss on Roth's distance-weighted triplets, with and without
                              rho-regularisation at his CUB/Cars p = 0.35
4. report    OUT/report.md and OUT/losses.png: mean ± sample std over the seeds, and for each
             comparison the difference of the means with Welch's t-test p-value (n = seeds).

--convergence (issue 23) runs, after step 1, only the two comparisons that did not reproduce at
3 epochs, now for CONVERGENCE_EPOCHS epochs with validation after every epoch, so that each arm's
validation recall@1 can plateau: RS@k at global batch 128 against 1,024 for the same epochs (whole
batches: an epoch is 95 x 128 = 12,160 images against 11 x 1,024 = 11,264, 7% fewer), and
the margin loss on Roth's distance-weighted triplets with p = 0 against p = 0.35; it writes
OUT/convergence.md and OUT/convergence.png (mean validation recall@1 against the epoch, per arm).
Sized for about 2 hours on 2 cores: each run's epoch (training and validation) took about 62 s with
another run beside it, so 12 runs of 15 epochs, 2 at a time, take about 95 minutes after the
pretraining (about 10 minutes). 30 epochs, the first size, would have taken over 3 hours.

Every step skips what is finished (the runner's markers, the sweeps' own skipping), so after a crash
or a kill the same command carries on. Runs go --jobs at a time, one thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.sweep import grid as sweep  # noqa: E402
from pipeline.sweep import plots as sweep_plots  # noqa: E402
from pipeline.run_dir import RunDir  # noqa: E402

# Multi-similarity: normalized softmax over these 1,558 classes of ~4 images stayed at chance (loss
# ln 1558) for 800 steps at lr 1e-4 and 1e-3; multi-similarity took its held-out recall@1 from 0.12 to 0.54.
PRETRAIN = ["data=glyphs", "data.min_fonts=4", "data.max_fonts=7", "data.test_fraction=0.2", "data.val_classes=0",
            "loss=multi_similarity", "train.max_steps=1500", "train.lr=5e-4", "train.head_lr=5e-4",
            "train.warmup_steps=50", "train.val_every=0", "eval.diagnostics=false"]
BENCHMARK = ["data=glyphs", "data.seed=0"]  # one class split and rendering for every seed of every method
# stage=eval with eval.models=[finetuned]: shard (shared), finetune, export, eval; the frozen encoder,
# the same for every run, is embedded once (step 2), not in each run.
PROTOCOL = [*BENCHMARK, "stage=eval", "eval.models=[finetuned]", "train.epochs=3", "train.warmup_steps=0",
            "train.val_every=50"]
OTHER_LOSSES = ("margin,margin_rho,triplet,triplet_rho,contrastive,contrastive_rho,multi_similarity,lifted,"
                "normalized_softmax,proxy_anchor,arcface,mpn")
SWEEPS = {  # name: (grid words before the seeds, fixed words after the protocol's)
    "losses": ([f"loss={OTHER_LOSSES}"], []),
    "rsk": (["loss=rsk,rsk_simix", "train.global_batch=128,512,2048"], []),
    "query_in_rank": (["train.include_query_in_rank=true"], ["loss=rsk"]),
    "rho": (["loss.p_switch=0,0.35"], ["loss=margin", "loss.miner=distance"]),
}
CONVERGENCE_EPOCHS = 15
CONVERGENCE_PROTOCOL = [*BENCHMARK, "stage=eval", "eval.models=[finetuned]", f"train.epochs={CONVERGENCE_EPOCHS}",
                        "train.warmup_steps=0", "train.val_every=0", "train.val_every_epochs=1"]
CONVERGENCE = {
    "convergence_batch": (["train.global_batch=128,1024"], ["loss=rsk"]),
    "convergence_rho": (["loss.p_switch=0,0.35"], ["loss=margin", "loss.miner=distance"]),
}
PLATEAU = 0.01  # an arm has plateaued when its last 5 validations' recall@1 span less than this
METRICS = ["recall@1", "recall@4", "map@r", "nmi", "best val/recall@1", "test/rho", "train/rho", "test/pi_ratio"]


def pipeline(run_dir: Path, *args: str) -> None:
    """One pipeline/run.py command, its output in run_dir/study.log; a failure ends the study."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"study: {run_dir.name}: python pipeline/run.py {' '.join(args)}", flush=True)
    with open(run_dir / "study.log", "ab") as log:
        status = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args, f"run_dir={run_dir}"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if status:
        sys.exit(f"study: {run_dir.name} failed (exit {status}); see {run_dir / 'study.log'}")


def run_sweeps(out: Path, start: Path, jobs: int, seeds: int, sweeps: dict = SWEEPS, protocol: list = PROTOCOL,
               seed_first: bool = False) -> None:
    """seed_first: the seed is the grid's slowest word, so each seed's arms run side by side and a study
    stopped early holds whole seeds of every arm (the convergence runs); else it is the fastest."""
    seed_word = "seed=" + ",".join(str(s) for s in range(seeds))
    for name, (grid, fixed) in sweeps.items():
        words = [seed_word, *grid] if seed_first else [*grid, seed_word]
        command = [sys.executable, str(REPO / "tools" / "sweep.py"), "--out", str(out / name), "--jobs", str(jobs),
                   *words, "--", *protocol, f"model.pretrained={start}", *fixed]
        print(f"study: sweep {name}", flush=True)
        if subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode:
            print(f"study: sweep {name} had failed runs (see {out / name / 'summary.md'}); carrying on", flush=True)


# ---- the report -----------------------------------------------------------------------------------

def frozen_metrics(out: Path) -> dict[str, float]:
    """The pretrained encoder's metrics on the benchmark (one run: no spread), by the sweeps' names."""
    rd = RunDir(out / "frozen")
    flat = {k: v for k, v in json.loads((rd.eval / "metrics.json").read_text())["frozen"].items()}
    for split, values in json.loads((rd.eval / "diagnostics.json").read_text())["frozen"].items():
        flat.update({f"{split}/{k}": v for k, v in values.items()})
    return flat


def settings(out: Path) -> dict[str, dict]:
    """Every setting of every sweep, named 'sweep: words', with its statistics."""
    found = {}
    for name in SWEEPS:
        path = out / name / sweep.SUMMARY_JSON
        if path.is_file():
            found.update({f"{name}: {setting}": stats for setting, stats in json.loads(path.read_text()).items()})
    return found


def cell(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats.get("std") is not None else "")


def welch(a: dict | None, b: dict | None) -> str:
    """b - a, and Welch's two-sided p-value where both have a spread."""
    from scipy.stats import ttest_ind_from_stats

    if not a or not b:
        return "n/a"
    diff = f"{b['mean'] - a['mean']:+.4f}"
    if not a.get("std") or not b.get("std") or a["n"] < 2 or b["n"] < 2:
        return diff
    p = ttest_ind_from_stats(a["mean"], a["std"], a["n"], b["mean"], b["std"], b["n"], equal_var=False).pvalue
    return f"{diff} (p = {p:.2g})"


def table(rows: dict[str, dict], metrics: list[str]) -> list[str]:
    lines = ["| setting | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(cell(stats.get(m)) for m in metrics) + " |" for name, stats in rows.items()]


def report(out: Path) -> str:
    frozen = {k: {"mean": v, "std": None, "n": 1} for k, v in frozen_metrics(out).items()}
    every = settings(out)
    base = "train.global_batch=128"
    losses = {"frozen (the pretrained encoder)": frozen}
    losses.update({f"loss={loss}": every.get(f"rsk: loss={loss} {base}", {}) for loss in ("rsk", "rsk_simix")})
    losses.update({setting.split(": ", 1)[1]: stats for setting, stats in every.items() if setting.startswith("losses:")})
    plotted = {k: {**v, **{f"frozen/{m}": frozen[m] for m in frozen}} for k, v in losses.items() if k.startswith("loss=")}
    sweep_plots.bars(plotted, ["recall@1", "map@r", "nmi", "test/rho"], out / "losses.png")
    rsk = every.get(f"rsk: loss=rsk {base}")
    lines = ["# The glyphs study", "", f"Made by `python tools/study_glyphs.py --out {out}`. Each cell: mean ± sample "
             "std over the seeds (the frozen encoder: one run). Comparisons: difference of the means, Welch's "
             "two-sided p-value.", "", "## Every loss under one protocol (batch 128)", "", *table(losses, METRICS), "",
             "![losses](losses.png)", "", "Each loss's recall@1 minus the frozen encoder's and minus RS@k's:", "",
             "| loss | minus frozen | minus RS@k |", "|---|---|---|"]
    lines += [f"| {name} | {welch(frozen['recall@1'], s.get('recall@1'))} | {welch(rsk and rsk.get('recall@1'), s.get('recall@1'))} |"
              for name, s in losses.items() if name.startswith("loss=")]
    batch = {b: {loss: every.get(f"rsk: loss={loss} train.global_batch={b}", {}) for loss in ("rsk", "rsk_simix")}
             for b in (128, 512, 2048)}
    lines += ["", "## RS@k against the batch (the same images seen)", "",
              "| global batch | RS@k recall@1 | RS@k map@r | + SiMix recall@1 | + SiMix map@r | SiMix - RS@k (recall@1) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {b} | {cell(s['rsk'].get('recall@1'))} | {cell(s['rsk'].get('map@r'))} | "
              f"{cell(s['rsk_simix'].get('recall@1'))} | {cell(s['rsk_simix'].get('map@r'))} | "
              f"{welch(s['rsk'].get('recall@1'), s['rsk_simix'].get('recall@1'))} |" for b, s in batch.items()]
    lines += ["", f"2,048 - 128, recall@1: RS@k {welch(batch[128]['rsk'].get('recall@1'), batch[2048]['rsk'].get('recall@1'))}, "
              f"+ SiMix {welch(batch[128]['rsk_simix'].get('recall@1'), batch[2048]['rsk_simix'].get('recall@1'))}.", "",
              "![batch](rsk/batch.png)", ""]
    query = {"include_query_in_rank=false (the default)": rsk or {},
             "include_query_in_rank=true (the authors' code)": every.get("query_in_rank: train.include_query_in_rank=true", {})}
    lines += ["## The query in its positives' ranks", "", *table(query, METRICS[:5]), "",
              f"true - false: recall@1 {welch(*(q.get('recall@1') for q in query.values()))}, "
              f"map@r {welch(*(q.get('map@r') for q in query.values()))}.", ""]
    rho = {"margin, pml's distance-weighted miner": every.get("losses: loss=margin", {}),
           "margin_rho (p = 0.2)": every.get("losses: loss=margin_rho", {}),
           "margin, Roth's miner, p = 0": every.get("rho: loss.p_switch=0", {}),
           "margin, Roth's miner, p = 0.35": every.get("rho: loss.p_switch=0.35", {})}
    pair = [rho["margin, Roth's miner, p = 0"], rho["margin, Roth's miner, p = 0.35"]]
    lines += ["## rho-regularisation of the margin loss", "", *table(rho, METRICS), "",
              f"p = 0.35 - p = 0: recall@1 {welch(*(p.get('recall@1') for p in pair))}, "
              f"test/rho {welch(*(p.get('test/rho') for p in pair))}, train/rho {welch(*(p.get('train/rho') for p in pair))}.", ""]
    return "\n".join(lines)


def curves(out: Path, name: str) -> dict[str, list[tuple[list[int], list[float]]]]:
    """setting -> each finished run's (validations' epochs, val/recall@1), from its logs/metrics.jsonl."""
    from pipeline.tracking import read_metrics, series

    found: dict[str, list] = {}
    if not (out / name / sweep.PLAN).is_file():
        return found
    for run in sweep.load_plan(out / name)[1]:
        path = RunDir(out / name / run.name).logs / "metrics.jsonl"
        if path.is_file():
            _, values = series(read_metrics(path), "val/recall@1")
            found.setdefault(run.setting, []).append((list(range(1, len(values) + 1)), values))
    return found


def plateaued(values: list[float]) -> bool:
    return len(values) >= 5 and max(values[-5:]) - min(values[-5:]) < PLATEAU


def convergence_report(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = {f"{name}: {s}": stats for name in CONVERGENCE if (out / name / sweep.SUMMARY_JSON).is_file()
             for s, stats in json.loads((out / name / sweep.SUMMARY_JSON).read_text()).items()}
    fig, axes = plt.subplots(1, len(CONVERGENCE), figsize=(10, 3.6))
    lines = ["# The two findings at convergence (issue 23)", "",
             f"Made by `python tools/study_glyphs.py --out {out} --convergence`: {CONVERGENCE_EPOCHS} epochs, validation "
             f"after each; plateaued = the last 5 validations' recall@1 span < {PLATEAU}.", "",
             "| arm | test recall@1 | test map@r | best val/recall@1 | runs plateaued |", "|---|---|---|---|---|"]
    means: dict[str, list[float]] = {}  # arm -> mean validation recall@1 at each epoch over its runs
    for ax, name in zip(axes, CONVERGENCE):
        for setting, runs in curves(out, name).items():
            stats = every.get(f"{name}: {setting}", {})
            lines.append(f"| {name}: {setting} | {cell(stats.get('recall@1'))} | {cell(stats.get('map@r'))} | "
                         f"{cell(stats.get('best val/recall@1'))} | {sum(plateaued(v) for _, v in runs)} of {len(runs)} |")
            length = min(len(v) for _, v in runs)
            means[setting] = [sum(v[i] for _, v in runs) / len(runs) for i in range(length)]
            ax.plot(range(1, length + 1), means[setting], label=setting)
        ax.set(title=name, xlabel="epoch", ylabel="val recall@1 (mean over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    plt.close(fig)
    lines += ["", "Mean validation recall@1 after each epoch (the curves):", "",
              "| epoch | " + " | ".join(means) + " |", "|---" * (len(means) + 1) + "|"]
    lines += [f"| {e + 1} | " + " | ".join(f"{m[e]:.4f}" if e < len(m) else "" for m in means.values()) + " |"
              for e in range(max((len(m) for m in means.values()), default=0))]
    pairs = [("convergence_batch", "train.global_batch=128", "train.global_batch=1024"),
             ("convergence_rho", "loss.p_switch=0", "loss.p_switch=0.35")]
    lines += [""] + [f"{name}: {b} - {a}, test recall@1 {welch(every.get(f'{name}: {a}', {}).get('recall@1'), every.get(f'{name}: {b}', {}).get('recall@1'))}."
                     for name, a, b in pairs]
    return "\n".join(lines + ["", "![convergence](convergence.png)", ""])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the study's folder")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one thread each)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--report", action="store_true", help="only write the report of what has run")
    parser.add_argument("--convergence", action="store_true", help="the batch-size and rho findings at convergence")
    options = parser.parse_args(argv)
    out = options.out.resolve()
    if options.convergence:
        if not options.report:
            pipeline(out / "pretrain", "stage=all", *PRETRAIN)
            run_sweeps(out, out / "pretrain" / "export", options.jobs, options.seeds, CONVERGENCE, CONVERGENCE_PROTOCOL,
                       seed_first=True)
        (out / "convergence.md").write_text(convergence_report(out))
        print(f"study: report in {out / 'convergence.md'}")
        return 0
    if not options.report:
        pipeline(out / "pretrain", "stage=all", *PRETRAIN)
        start = out / "pretrain" / "export"
        pipeline(out / "frozen", "stage=eval", "eval.models=[frozen]", *BENCHMARK, f"model.pretrained={start}")
        run_sweeps(out, start, options.jobs, options.seeds)
    (out / "report.md").write_text(report(out))
    print(f"study: report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
