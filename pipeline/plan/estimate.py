"""From simulated steps to a plan: memory per GPU by category, the largest chunk that fits, FLOPs,
bytes sent, step and epoch time.

Where each figure comes from:
  fsdp2          the fake run of the FSDP2 engine: everything tracked (FSDPMemTracker)
  ddp            the fake run of the single-device engine (DDP's C++ reducer cannot run on fake
                 tensors) + DDP's gradient buckets in closed form (a copy of the fp32 gradients:
                 gradient_as_bucket_view=False, DDP's default) + its all-reduce of them
  zero1-3        DeepSpeed's own model-state estimators (estimate_zero2/3_model_states_mem_needs,
                 what its *_all_cold functions print; ZeRO-1 = the stage-2 figure + the gradients
                 it does not partition) + the activations, temporaries and inputs of the fake run
                 of the same chunk on the single-device engine; traffic in closed form
  none           the fake run of the single-device engine

The simulation runs two chunks per rank (simulate.simulated_share): the rest of the share's images
and embeddings are added, and the per-chunk FLOPs and all-gathers scaled to the whole share.
Memory the tracker cannot see is a stated allowance (ALLOWANCE_GIB, FRAGMENTATION).
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.config import Config
from pipeline.config.backends import backend as described
from pipeline.models.accounting import peak_flops_of
from pipeline.parallel.precision import matmul_precision
from pipeline.parallel.shares import check_shares
from pipeline.errors import UserError
from pipeline.plan import gpus
from pipeline.plan.dataset_size import train_images
from pipeline.plan.depth import at_depth, extrapolate, full_depth, simulated_depths
from pipeline.plan.simulate import Measurement, fake_group, simulate

GIB = 2 ** 30
# What the tracker cannot see, per GPU. CUDA context: 0.3-0.6 GiB on A100/H100 with CUDA 12's lazy
# module loading (what nvidia-smi shows for a process that has only initialised CUDA; PyTorch's
# "CUDA semantics" notes call it the memory the context takes outside the caching allocator).
# NCCL: NCCL_BUFFSIZE is 4 MiB per channel and peer by default (NCCL's environment variable docs),
# with up to 32 channels and a send and a receive buffer: 0.25 GiB for a ring, twice that with
# NVLS/tree buffers on H100 nodes.
ALLOWANCE_GIB = {"CUDA context": 0.6, "NCCL buffers": 0.5}
# The caching allocator reserves more than its live tensors (block rounding, split blocks that cannot
# be reused): 10 % of the tracked peak, torchtitan's and FSDP2 users' usual reserved/allocated gap.
FRAGMENTATION = 0.10
MAX_RUNS = 8  # fake runs (chunk sizes) the search may make


@dataclasses.dataclass
class Fit:
    """Per-GPU memory of one chunk size: phase -> bytes, and the peak's categories -> bytes."""
    chunk: int
    phases: dict[str, float]
    categories: dict[str, float]

    @property
    def tracked(self) -> float:
        return max(self.phases.values())

    @property
    def total(self) -> float:
        return self.tracked * (1 + FRAGMENTATION) + sum(ALLOWANCE_GIB.values()) * GIB


def world_size(cfg: Config) -> int:
    return cfg.plan.nodes * cfg.plan.gpus_per_node


def measure(cfg: Config, chunk: int, depth: int | None = None) -> Measurement:
    """The fake step (two steps) at `chunk`, on the engine that stands for parallel.name; `depth`: the
    model's number of blocks, to simulate two smaller depths and extrapolate exactly (depth.py)."""
    backend = "none" if described(cfg.parallel.name).deepspeed else None
    depths = simulated_depths(cfg, depth) if depth else None
    if not depths:
        with fake_group(world_size(cfg)):
            return simulate(cfg, chunk, backend=backend)
    runs = []
    for d in depths:
        with fake_group(world_size(cfg)):
            runs.append(simulate(at_depth(cfg, d), chunk, backend=backend))
    return extrapolate(*runs, *depths, depth)


def image_bytes(cfg: Config) -> int:
    """One image as the loader gives it (fp32, 3 x S x S), its label and its pass-1 embedding (fp32)."""
    return 4 * 3 * cfg.model.image_size ** 2 + 8 + 4 * cfg.model.embed_dim


def zero_states(cfg: Config, m: Measurement) -> float:
    """Parameters, gradients and optimizer state per GPU under ZeRO, from DeepSpeed's estimators
    (16-bit weights, as parallel.param_dtype=auto gives)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, b = cfg.plan, described(cfg.parallel.name)
    if b.deepspeed_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(m.trainable, m.largest_block, p.gpus_per_node, p.nodes,
                                                          cpu_offload=b.offloads_optimizer, cpu_offload_params=False)
        return gpu
    _, gpu = estimate_zero2_model_states_mem_needs(m.trainable, p.gpus_per_node, p.nodes, cpu_offload=False)
    if not b.shards_gradients:  # stage 1 keeps whole 16-bit gradients on every rank; stage 2 a 1/world share
        gpu += 2 * m.trainable * (1 - 1 / world_size(cfg))
    return gpu


def fit_of(cfg: Config, m: Measurement) -> Fit:
    """Per-GPU memory at m.chunk: the simulated peaks, with the whole share's inputs, DDP's buckets or
    ZeRO's model states."""
    share = cfg.train.global_batch // world_size(cfg)
    extra = (share - m.images) * image_bytes(cfg)
    phases = {k: v + extra for k, v in m.phase_peak.items()}
    categories = {k: float(v) for k, v in m.at_peak.items()}
    categories["Inputs (rest of the share)"] = float(extra)
    b = described(cfg.parallel.name)
    if b.replicated:
        buckets = 4.0 * m.trainable
        phases = {k: v + buckets for k, v in phases.items()}
        categories["DDP gradient buckets (closed form)"] = buckets
    elif b.deepspeed:  # the peak of all but the whole model states, plus ZeRO's sharded ones
        states = zero_states(cfg, m)
        phases = {k: m.phase_rest[k] + extra + states for k in m.phase_rest}
        top = max(phases, key=phases.get)
        categories = {k: float(v) for k, v in m.phase_rest_at[top].items()}
        categories["Inputs (rest of the share)"] = float(extra)
        categories["ZeRO model states (DeepSpeed estimator)"] = float(states)
    return Fit(m.chunk, phases, categories)


def valid_chunks(cfg: Config) -> list[int]:
    """Chunk sizes a run accepts: on several ranks, the divisors of the per-rank share (check_shares)."""
    world, batch = world_size(cfg), cfg.train.global_batch
    share = batch // world
    return [c for c in range(1, share + 1) if world == 1 or share % c == 0]


def predict(a: Fit, b: Fit, chunk: int) -> float:
    """The total at `chunk`, each phase's peak linear in the chunk through the two measured ones (a
    fake step costs the same whatever the chunk, so two runs pin the line)."""
    phases = {k: a.phases[k] + (b.phases[k] - a.phases[k]) * (chunk - a.chunk) / (b.chunk - a.chunk) for k in a.phases}
    return max(phases.values()) * (1 + FRAGMENTATION) + sum(ALLOWANCE_GIB.values()) * GIB


def largest_chunk(cfg: Config, first: Fit, measure_fit, budget: float) -> tuple[Fit | None, list[Fit]]:
    """The largest valid chunk whose total fits `budget` bytes. Below the whole share a step accumulates
    over several chunks, and each phase's peak is linear in the chunk: two measured chunks pin the line,
    and the line's answer is confirmed by one more fake run (stepping down while it does not fit, up
    while the next chunk fits too: the line is close, not exact). A
    chunk of the whole share is off that line (one chunk, no accumulation: FSDP2 then holds no unsharded
    gradients between chunks), so it is measured first, as the largest candidate. Returns (its Fit or
    None, every Fit measured)."""
    chunks = valid_chunks(cfg)
    share, below = chunks[-1], chunks[:-1]
    fits = {first.chunk: first}

    def fit(chunk: int) -> Fit:
        if chunk not in fits:
            fits[chunk] = measure_fit(chunk)
        return fits[chunk]

    candidates = below
    if len(below) >= 2:
        a = first.chunk if first.chunk < share else below[-1]
        b = next((c for c in reversed(below) if c <= a // 2), None) or next(c for c in below if c != a)
        lo, hi = sorted((fit(a), fit(b)), key=lambda f: f.chunk)
        candidates = [c for c in below if predict(lo, hi, c) <= budget]
    best = next((c for c in reversed([*candidates, share]) if fit(c).total <= budget or len(fits) >= MAX_RUNS), None)
    if best is None or fits[best].total > budget:  # nothing confirmed: the largest measured that fits, if any
        fitting = [f for f in fits.values() if f.total <= budget]
        return (max(fitting, key=lambda f: f.chunk) if fitting else None), list(fits.values())
    while best != share and len(fits) < MAX_RUNS and fit(up := chunks[chunks.index(best) + 1]).total <= budget:
        best = up
    return fits[best], list(fits.values())


def flops_per_step(cfg: Config, m: Measurement) -> float:
    """This rank's FLOPs in one step with its whole share: the embedding passes scale with the images."""
    scale = (cfg.train.global_batch // world_size(cfg)) / m.images
    f = m.phase_flops
    return (f["pass1"] + f["pass2"]) * scale + f["loss"] + f["optimizer"]


def bytes_sent(cfg: Config, m: Measurement) -> dict[str, float]:
    """Bytes this rank sends per step, by collective: the simulation's, scaled to the whole share
    where a call happens per chunk or per row; DDP's and ZeRO's gradient traffic in closed form."""
    world = world_size(cfg)
    scale = (cfg.train.global_batch // world) / m.images
    labels = {"all_gather_single": "all-gather, FSDP2 weights (per chunk and pass)",
              "reduce_scatter_single": "reduce-scatter, FSDP2 gradients",
              "all_gather": "all-gather, embeddings and labels", "reduce_scatter_tensor": "reduce-scatter, embedding gradients",
              "all_reduce": "all-reduce, loss and gradient norm"}
    sent = {labels.get(k, k): v * (1.0 if k in ("reduce_scatter_single", "all_reduce") else scale)
            for k, v in m.sent.items()}
    ring, n, chunks = (world - 1) / world, m.trainable, (cfg.train.global_batch // world) // m.chunk
    b = described(cfg.parallel.name)
    if b.replicated:
        sent["all-reduce, DDP gradients (closed form)"] = 2 * ring * 4 * n
    elif b.deepspeed and not b.gathers_weights:  # 16-bit gradients reduced (every chunk under ZeRO-2), weights gathered after the step
        sent["reduce-scatter, ZeRO gradients (closed form)"] = ring * 2 * n * (chunks if b.shards_gradients else 1)
        sent["all-gather, ZeRO weights (closed form)"] = ring * 2 * n
    elif b.deepspeed:  # ZeRO-3: weights gathered per forward (pass 1, pass 2 and its recomputation) and backward
        passes = 3 + (1 if cfg.model.grad_checkpointing else 0)
        sent["all-gather, ZeRO-3 weights (closed form)"] = ring * 2 * n * chunks * passes
        sent["reduce-scatter, ZeRO-3 gradients (closed form)"] = ring * 2 * n * chunks
    return sent


def bandwidth_gbps(cfg: Config, gpu: gpus.GPU) -> float:
    if cfg.plan.bandwidth_gbps:
        return cfg.plan.bandwidth_gbps
    bw = gpu.nvlink_gbps if cfg.plan.nodes == 1 else gpu.network_gbps
    if not bw:
        raise UserError(f"the bandwidth of {gpu.name} is unknown; set plan.bandwidth_gbps (Gbit/s per GPU)")
    return bw


def matmul(cfg: Config) -> str:
    """What the run's matmuls compute in on a GPU (bf16, tf32, fp32): the peak its step time is planned at."""
    return matmul_precision(cfg.train.precision, cfg.train.tf32, torch.device("cuda"))


def peak_flops(cfg: Config, gpu: gpus.GPU) -> float:
    peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops > 0 else peak_flops_of(gpu.name, matmul(cfg))
    if not peak:
        raise UserError(f"the peak {matmul(cfg)} FLOP/s of {gpu.name} is unknown; set train.peak_tflops")
    return peak


def suggested_chunk(cfg: Config, now: Measurement, best: Measurement | None) -> int | None:
    """The largest chunk that fits, where it is larger than train.chunk_size and each GPU sends fewer bytes
    per step with it (fewer chunks: fewer weight gathers under fsdp2 and zero3, gradient reductions under zero2)."""
    if best is None or best.chunk <= now.chunk:
        return None
    return best.chunk if sum(bytes_sent(cfg, best).values()) < sum(bytes_sent(cfg, now).values()) else None


def plan(cfg: Config, log=print, measured: dict[int, Measurement] | None = None) -> dict:
    """Everything plan.json holds. Raises UserError for a cluster the settings cannot run on.
    `measured`: chunk -> Measurement, shared by plans that differ only in the GPU (memory does not
    depend on it, only the budget and the times do: tools/plan_table.py); filled as the plan measures."""
    world = world_size(cfg)
    check_shares(cfg.train, world)
    gpu = gpus.gpu(cfg.plan.gpu, cfg.plan.gpu_memory_gb)
    budget = gpu.memory_gib * GIB
    _ = train_images(cfg), bandwidth_gbps(cfg, gpu), peak_flops(cfg, gpu)  # a missing input fails before simulating
    runs: list[float] = []

    def measure_fit(chunk: int) -> Fit:
        if chunk not in measured:
            blocks = simulated_depths(cfg, depth) if depth else None
            log(f"simulating {world} ranks, chunk {chunk}" + (f", {blocks[0]} and {blocks[1]} of {depth} blocks" if blocks
                                                              else "") + " ...")
            measured[chunk] = measure(cfg, chunk, depth)
            runs.append(measured[chunk].seconds)
        return fit_of(cfg, measured[chunk])

    measured = {} if measured is None else measured
    depth = None if cfg.plan.all_blocks else full_depth(cfg)
    first = measure_fit(cfg.train.chunk_size)
    m = measured[cfg.train.chunk_size]
    best, fits = largest_chunk(cfg, first, measure_fit, budget) if cfg.plan.search else (None, [first])
    flops = flops_per_step(cfg, m)
    sent = bytes_sent(cfg, m)
    bw = bandwidth_gbps(cfg, gpu)
    compute_s = flops / (cfg.plan.mfu * peak_flops(cfg, gpu))
    comm_s = sum(sent.values()) * 8 / (bw * 1e9)
    step_s = compute_s + comm_s
    steps = train_images(cfg) // cfg.train.global_batch
    memory = {k: v / GIB for k, v in first.categories.items() if v}
    memory.update({f"allowance: {k}": v for k, v in ALLOWANCE_GIB.items()})
    memory["allowance: allocator fragmentation"] = first.tracked * FRAGMENTATION / GIB
    return {
        "world_size": world, "nodes": cfg.plan.nodes, "gpus_per_node": cfg.plan.gpus_per_node, "gpu": gpu.name,
        "gpu_memory_gb": gpu.memory_gib, "model": cfg.model.name, "parallel": cfg.parallel.name,
        "global_batch": cfg.train.global_batch, "chunk_size": cfg.train.chunk_size,
        "precision": {"autocast": "fp32" if cfg.train.precision == "fp32" else "bf16",
                      "param_dtype": cfg.parallel.param_dtype, "matmul": matmul(cfg)},
        "fits": first.total <= budget, "peak_gb_per_gpu": first.total / GIB, "tracked_peak_gb": first.tracked / GIB,
        "searched": cfg.plan.search, "largest_chunk": best.chunk if best else None,
        "largest_chunk_peak_gb": best.total / GIB if best else None,
        "memory_gb": memory, "phases_gb": {k: v / GIB for k, v in first.phases.items()},
        "chunks_measured": {f.chunk: f.total / GIB for f in fits},
        "parameters": m.parameters, "trainable": m.trainable,
        "flops_per_step": flops * world, "flops_per_step_per_gpu": flops,
        "bytes_sent_per_gpu": sent, "bandwidth_gbps": bw, "mfu": cfg.plan.mfu,
        "peak_tflops": peak_flops(cfg, gpu) / 1e12,
        "compute_s": compute_s, "comm_s": comm_s, "step_s": step_s,
        "train_images": train_images(cfg), "steps_per_epoch": steps,
        "suggested_chunk": suggested_chunk(cfg, m, measured[best.chunk] if best else None),
        "epoch_h": steps * step_s / 3600, "gpu_hours_per_epoch": steps * step_s / 3600 * world,
        "simulation_s": runs, "blocks": depth,
        "blocks_simulated": list(simulated_depths(cfg, depth) or []) if depth else None,
    }
