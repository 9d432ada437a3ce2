"""RS@k and SiMix speed against the elementwise limit, the kernels against each other; peak memory.

Speed, all ratios measured in one run, the sides alternated round by round (the order reversed every
other round), wall and CPU time (this process's threads) both reported:

- RS@k forward + backward at B (default 4,000, D = 512, 4 per class) with each kernel
  (`train.rsk_kernel`: torch, reference), from the embeddings (the Gram matrix e e^T and its backward
  included) and from the similarity matrix (the part the kernels compute), against one elementwise
  sigmoid pass over pairs x B elements: `torch.sigmoid(x)` as written (a fresh output) and
  `torch.sigmoid(x, out=y)` into a warm buffer (arithmetic and bandwidth only, the strict limit).
- The same with SiMix: B originals plus every within-class virtual sample (B + B(K-1)/2 rows at K = 4);
  its sigmoid pass over pairs x rows elements is run in pieces of the RS@k pass's size.
- --loop-queries N: the authors' per-query loop (their released code: for one query, the (B x B) matrix
  of sigmoid differences, then backward) on N queries, scaled to B, and its loss and gradient checked
  against the vectorised loss restricted to those queries.
- --before REV: the same RS@k and SiMix forward + backward with the code of git revision REV (its
  `pipeline/` extracted to a temporary folder and imported in a subprocess), each after a sigmoid(x)
  pass of the RS@k size, for the figures before a change.
- --compile: torch.compile (inductor) of the whole-batch smooth ranks, forward and backward, compile time
  counted, against the torch kernel on the same similarity matrix.

Memory: each case in a fresh subprocess that builds its inputs, records its resident set size (RSS),
runs forward + backward, and reports the peak RSS (VmHWM) and the peak minus the RSS before the
loss (what the loss itself added, at most).

    bash tools/env.sh python tools/bench_recall_at_k.py [--batch 4000] [--dim 512] [--rounds 3] [--simix]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.losses import RecallAtK, RecallAtKSiMix, recall_at_k_loss, set_step  # noqa: E402
from pipeline.losses.recall_at_k import padded_positives  # noqa: E402
from pipeline.losses.rsk_fused import smooth_ranks  # noqa: E402
from pipeline.models.accounting import high_water_kib  # noqa: E402

KS, TAU_RANK, TAU_COUNT = (1, 2, 4, 8, 16), 0.01, 1.0


def inputs(batch: int, dim: int, per_class: int, seed: int = 0):
    """Embeddings around one random centre per class (noise 1.5x the centre), so that ranks and the
    loss are far from their values on pure noise (loss ~1) and the loop/vectorised check means something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch // per_class).repeat_interleave(per_class)[torch.randperm(batch, generator=g)]
    centres = torch.randn(batch // per_class, dim, generator=g)
    return F.normalize(centres[labels] + 1.5 * torch.randn(batch, dim, generator=g), dim=1), labels


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def fwd_bwd(make_loss) -> dict:
    """Seconds (wall, cpu) of forward, backward and both."""
    start = clock()
    loss = make_loss()
    forward = since(start)
    mid = clock()
    loss.backward()
    backward = since(mid)
    return {"fwd": forward, "bwd": backward, "total": (forward[0] + backward[0], forward[1] + backward[1]),
            "loss": loss.item()}


def sigmoid_pass(x: torch.Tensor, y: torch.Tensor, pieces: int, out: bool) -> dict:
    """One sigmoid over pieces x numel(x) elements: as written (fresh outputs) or into a warm buffer."""
    start = clock()
    for _ in range(pieces):
        torch.sigmoid(x, out=y) if out else torch.sigmoid(x)
    return {"total": since(start)}


def rounds(sides: dict, n: int) -> dict[str, list[dict]]:
    """Every side once per round, in alternating order; {side: [result per round]}."""
    results = {name: [] for name in sides}
    for r in range(n):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            results[name].append(sides[name]())
    return results


def median(results: list[dict], key: str, which: int) -> float:
    return statistics.median(res[key][which] for res in results)


def ratios(results: dict, side: str, limit: str) -> tuple[float, float]:
    """Median over rounds of the per-round ratio side / limit, on wall and on CPU time."""
    per_round = list(zip(results[side], results[limit]))
    return tuple(statistics.median(s["total"][w] / b["total"][w] for s, b in per_round) for w in (0, 1))


def report(title: str, results: dict, limits: tuple[str, str], n_rounds: int) -> list[str]:
    lines = [f"{title} (median of {n_rounds} rounds; wall / CPU seconds; ratios per round, then median)"]
    for side, res in results.items():
        parts = [f"{k} {median(res, k, 0):.3f} / {median(res, k, 1):.3f}" for k in ("fwd", "bwd", "total") if k in res[0]]
        text = f"  {side:<24} " + "  ".join(parts)
        if side not in limits:
            text += "  ratio to " + ", ".join(
                f"{limit}: {ratios(results, side, limit)[0]:.2f}x wall, {ratios(results, side, limit)[1]:.2f}x CPU"
                for limit in limits)
        lines.append(text)
    return lines


def rsk_sides(emb, labels, pairs: int, block: int | None) -> tuple[dict, torch.Tensor]:
    b = len(labels)
    x = torch.randn(pairs, b)
    y = torch.empty_like(x)
    sim = (emb @ emb.T).contiguous()
    rows = torch.arange(b)

    def at_sim(kernel):
        from pipeline.losses.recall_at_k import rsk_rows
        s = sim.clone().requires_grad_()
        return rsk_rows(s, labels, rows, KS, TAU_RANK, TAU_COUNT, kernel=kernel, block=block)

    def from_emb(kernel):
        return RecallAtK(KS, TAU_RANK, TAU_COUNT, kernel=kernel)(emb.clone().requires_grad_(), labels)

    return {
        "sigmoid(x)": lambda: sigmoid_pass(x, y, 1, out=False),
        "sigmoid(x, out=y)": lambda: sigmoid_pass(x, y, 1, out=True),
        "torch kernel, from sim": lambda: fwd_bwd(lambda: at_sim("torch")),
        "torch kernel, from emb": lambda: fwd_bwd(lambda: from_emb("torch")),
        "reference, from emb": lambda: fwd_bwd(lambda: from_emb("reference")),
    }, x


def simix_sides(emb, labels, per_class: int, x: torch.Tensor, reference: bool) -> tuple[dict, int, int]:
    loss_fn = RecallAtKSiMix(KS, TAU_RANK, TAU_COUNT, per_class=0, seed=0, kernel="torch")
    set_step(loss_fn, 0)
    rows = len(labels) + len(labels) // per_class * per_class * (per_class - 1) // 2
    elements = rows * (per_class + per_class * (per_class - 1) // 2 - 1) * rows   # pairs x rows
    pieces = round(elements / x.numel())
    y = torch.empty_like(x)
    sides = {
        "sigmoid(x)": lambda: sigmoid_pass(x, y, pieces, out=False),
        "sigmoid(x, out=y)": lambda: sigmoid_pass(x, y, pieces, out=True),
        "SiMix, torch kernel": lambda: fwd_bwd(lambda: loss_fn(emb.clone().requires_grad_(), labels)),
    }
    if reference:
        ref = RecallAtKSiMix(KS, TAU_RANK, TAU_COUNT, per_class=0, seed=0, kernel="reference")
        set_step(ref, 0)
        sides["SiMix, reference"] = lambda: fwd_bwd(lambda: ref(emb.clone().requires_grad_(), labels))
    return sides, rows, pieces * x.numel()


def authors_style_query_loss(emb: torch.Tensor, labels: torch.Tensor, q: int) -> torch.Tensor:
    """RS@k of one query: the (B x B) sigmoid-difference matrix over all database items."""
    b = len(labels)
    sim = emb[q] @ emb.T                                            # (B,)
    diff = sim[None, :] - sim[:, None]                              # [p, z] = s_qz - s_qp
    mask = ~torch.eye(b, dtype=torch.bool)                          # z != p
    mask[:, q] = False                                              # z != q
    rank = 1 + (torch.sigmoid(diff / TAU_RANK) * mask).sum(1)       # rank of every item p
    pos = labels == labels[q]
    pos[q] = False
    n_pos = int(pos.sum())
    recalls = []
    for k in KS:
        k = min(k, b - 1)
        count = torch.sigmoid((k - rank[pos]) / TAU_COUNT).sum()
        recalls.append(torch.clamp(count, max=k) / min(k, n_pos))
    return 1 - torch.stack(recalls).mean()


def loop_check(emb, labels, queries: int, vectorised_total: float) -> list[str]:
    e = emb.clone().requires_grad_()
    total = 0.0
    tic = time.perf_counter()
    for q in range(queries):
        loss = authors_style_query_loss(e, labels, q) / queries
        loss.backward()
        total += loss.item()
    loop = time.perf_counter() - tic
    scaled = loop * len(labels) / queries
    v = emb.clone().requires_grad_()
    subset = recall_at_k_loss(v @ v.T, labels, KS, TAU_RANK, TAU_COUNT, query_mask=torch.arange(len(labels)) < queries)
    subset.backward()
    grad_err = ((v.grad - e.grad).norm() / e.grad.norm()).item()
    assert abs(total - subset.item()) < 1e-5 and grad_err < 1e-3, "the loop and the vectorised loss disagree"
    return [f"authors' per-query loop: {loop:.2f} s for {queries} queries -> {scaled:.0f} s for {len(labels)}; "
            f"same loss on those queries ({total:.6f} vs {subset.item():.6f}), relative gradient difference "
            f"{grad_err:.1e}; the torch kernel is {scaled / vectorised_total:.0f}x faster"]


def compile_check(emb, labels) -> list[str]:
    """Inductor's fusion of the whole-batch smooth ranks against the torch kernel, same inputs."""
    sim = emb @ emb.T
    rows = torch.arange(len(labels))
    cols, _ = padded_positives(labels, rows)
    inv_tau = 1.0 / TAU_RANK

    def forward(s, c):
        scaled = s * inv_tau
        return torch.sigmoid(scaled[:, None, :] - scaled.gather(1, c)[:, :, None]).sum(-1)

    def backward(s, c, g):
        scaled = s * inv_tau
        sig = torch.sigmoid(scaled[:, None, :] - scaled.gather(1, c)[:, :, None])
        slope = g[:, :, None] * sig * (1 - sig)
        return slope.sum(1), slope.sum(-1)

    start = time.perf_counter()
    fwd, bwd = torch.compile(forward, dynamic=False), torch.compile(backward, dynamic=False)
    g = torch.randn(cols.shape)
    fwd(sim, cols), bwd(sim, cols, g)
    compile_s = time.perf_counter() - start
    compiled, kernel = [], []
    for _ in range(3):
        t = clock()
        fwd(sim, cols), bwd(sim, cols, g)
        compiled.append(since(t)[0])
        s = sim.clone().requires_grad_()
        t = clock()
        smooth_ranks(s, cols, rows, TAU_RANK).backward(g)
        kernel.append(since(t)[0])
    return [f"torch.compile of the smooth ranks (forward + backward, whole batch): compile {compile_s:.1f} s, then "
            f"{statistics.median(compiled):.3f} s per step against {statistics.median(kernel):.3f} s for the torch "
            f"kernel (median of 3)"]


BEFORE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
import pipeline.losses as L
from tools.bench_recall_at_k import inputs
assert L.__file__.startswith(sys.argv[1]), L.__file__
emb, labels = inputs(int(sys.argv[2]), int(sys.argv[3]), 4)
x = torch.randn(len(labels) * 3, len(labels))
for case in ("rsk", "rsk_simix"):
    loss_fn = L.RecallAtK((1, 2, 4, 8, 16), 0.01, 1.0) if case == "rsk" else L.RecallAtKSiMix(
        (1, 2, 4, 8, 16), 0.01, 1.0, per_class=0, seed=0)
    L.set_step(loss_fn, 0)
    loss_fn(*inputs(64, 16, 4)).item()  # warm-up: first calls pay one-off set-up costs
    t = (time.perf_counter(), time.process_time())
    torch.sigmoid(x)
    sig = (time.perf_counter() - t[0], time.process_time() - t[1])
    e = emb.clone().requires_grad_()
    t = (time.perf_counter(), time.process_time())
    loss_fn(e, labels).backward()
    total = (time.perf_counter() - t[0], time.process_time() - t[1])
    print(f"  {case:<10} fwd+bwd {total[0]:.2f} / {total[1]:.2f} s (wall / CPU); sigmoid(x) just before "
          f"{sig[0]:.3f} / {sig[1]:.3f} s: {total[0] / sig[0]:.1f}x wall, {total[1] / sig[1]:.1f}x CPU", flush=True)
"""


def before(rev: str, batch: int, dim: int) -> None:
    """RS@k and SiMix with the code of another git revision, in a subprocess."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "archive", rev, "pipeline", "tools"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        print(f"revision {rev}, B={batch}:", flush=True)
        subprocess.run([sys.executable, "-c", BEFORE, folder, str(batch), str(dim)], check=True)


def memory_child(case: str, batch: int, dim: int, per_class: int, kernel: str) -> None:
    emb, labels = inputs(batch, dim, per_class)
    emb.requires_grad_()
    if case == "rsk":
        loss_fn, total = RecallAtK(KS, TAU_RANK, TAU_COUNT, kernel=kernel), batch
    else:
        loss_fn = RecallAtKSiMix(KS, TAU_RANK, TAU_COUNT, per_class=0, seed=0, kernel=kernel)
        set_step(loss_fn, 0)
        total = batch + batch // per_class * per_class * (per_class - 1) // 2
    before = high_water_kib()
    rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    loss_fn(emb, labels).backward()
    peak = high_water_kib()
    print(json.dumps({"case": case, "batch": batch, "rows": total, "peak_mib": peak / 1024,
                      "added_mib": (peak - max(rss_before, 0)) / 1024, "peak_before_mib": before / 1024}))


def measure_memory(case: str, batch: int, dim: int, per_class: int, kernel: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case, "--batch", str(batch), "--dim", str(dim),
                          "--per-class", str(per_class), "--kernel", kernel], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, help="torch kernel: elements per slab (default: rsk_fused.CPU_BLOCK)")
    parser.add_argument("--simix", action="store_true", help="also SiMix with every within-class pair")
    parser.add_argument("--simix-reference", action="store_true", help="also SiMix with the reference kernel (slow)")
    parser.add_argument("--loop-queries", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--before", metavar="REV", help="also RS@k and SiMix with the code of this git revision")
    parser.add_argument("--memory", action="store_true", help="peak memory of each case and kernel")
    parser.add_argument("--memory-child", choices=["rsk", "rsk_simix"])
    parser.add_argument("--kernel", default="torch")
    a = parser.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.batch, a.dim, a.per_class, a.kernel)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.batch}, D={a.dim}, "
          f"{a.per_class} per class, load average {os.getloadavg()[0]:.1f}", flush=True)
    emb, labels = inputs(a.batch, a.dim, a.per_class)
    pairs = a.batch * (a.per_class - 1)
    small = inputs(64, a.dim, a.per_class)
    for kernel in ("torch", "reference"):  # warm-up: first calls pay one-off set-up costs
        RecallAtK(KS, kernel=kernel)(small[0].clone().requires_grad_(), small[1]).backward()
    sides, x = rsk_sides(emb, labels, pairs, a.block)
    results = rounds(sides, a.rounds)
    lines = report(f"RS@k, B = {a.batch}, {pairs} pairs x {a.batch} = {pairs * a.batch / 1e6:.0f}M elements", results,
                   ("sigmoid(x)", "sigmoid(x, out=y)"), a.rounds)
    print("\n".join(lines), flush=True)
    if a.loop_queries:
        print("\n".join(loop_check(emb, labels, a.loop_queries, median(results["torch kernel, from emb"], "total", 0))),
              flush=True)
    if a.compile:
        print("\n".join(compile_check(emb, labels)), flush=True)
    if a.simix or a.simix_reference:
        sides, rows, elements = simix_sides(emb, labels, a.per_class, x, a.simix_reference)
        n = 1 if a.simix_reference else a.rounds
        print("\n".join(report(f"RS@k + SiMix, {a.batch} originals + every within-class pair = {rows} rows, "
                               f"{elements / 1e6:.0f}M pair x column elements", rounds(sides, n),
                               ("sigmoid(x)", "sigmoid(x, out=y)"), n)), flush=True)
    if a.before:
        before(a.before, a.batch, a.dim)
    if a.memory:
        for case in ("rsk", "rsk_simix"):
            for kernel in ("torch", "reference"):
                m = measure_memory(case, a.batch, a.dim, a.per_class, kernel)
                print(f"memory {case}, {kernel} kernel: {m['rows']} rows (B={m['batch']}): peak RSS {m['peak_mib']:.0f} "
                      f"MiB, added by the loss {m['added_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
