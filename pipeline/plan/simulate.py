"""The finetune step itself, on fake tensors at any world size: per-rank memory, FLOPs and traffic.

`simulate(cfg, world_size, chunk)` builds the encoder on the meta device, moves it with `to_empty`
into a FakeTensorMode (timm's drop-path schedule calls .item() when built inside one), wraps it in
the project's engine over a fake process group of `world_size` ranks (torch's FakeStore, backend
"fake": collectives return at once with the right shapes) and runs `two_pass_step` for two steps on
the CPU device, under bf16 CPU autocast where the run would use bf16 on GPUs (fake CUDA tensors fail
in the backward without a GPU). Rank 0's memory is tracked by torch's FSDPMemTracker (fsdp2) or
MemTracker (others), its FLOPs by FlopCounterMode, its collectives by wrapping torch.distributed's.

The loss makes data-dependent calls (sorting labels into classes, `int(count.max())`) that fake
tensors cannot answer, so it runs on real tensors of the same shapes (`RealLoss`: random unit
embeddings, P x K labels), outside the fake mode: RS@k at B = 4,000 costs about a second on a CPU.
The rank's tracker ignores what runs outside its fake mode, so the loss runs under a MemTracker of
its own, and its peak (matrices, gradient) is added to what the rank holds when the loss is called.

A fake op costs the same whatever its size, so a simulated rank embeds only two chunks per step
(`simulated_share`): enough for the accumulation without gradient sync (chunks before the last)
and the synchronising last chunk; the loss still runs at the whole global batch, and estimate.py
adds the rest of the share's images and scales the FLOPs.

With fake=False the same code runs on real tensors over the process group already there (the
tests compare the two).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from copy import deepcopy
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config
from pipeline.parallel import distributed
from pipeline.parallel import engine as engines
from pipeline.parallel.precision import resolve, resolve_param_dtype
from pipeline.losses import build_loss, set_step
from pipeline.models.encoders import build_encoder
from pipeline.train.optim import build_optimizer
from pipeline.train.two_pass import two_pass_step

PHASES = ("pass1", "loss", "pass2", "optimizer")  # two_pass_step's timer phases
# Collectives wrapped to count bytes; ring algorithms: a rank sends (w-1)/w of the gathered or
# reduced tensor for all-gather and reduce-scatter, twice that for all-reduce (NCCL's bus bandwidth).
COLLECTIVES = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather": "all_gather",
               "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
               "all_reduce": "all_reduce", "broadcast": "broadcast"}  # function -> kind (the bytes' formula)


@dataclasses.dataclass
class Measurement:
    """Rank 0's figures for one simulated step (the second; bytes, FLOPs)."""
    world_size: int
    chunk: int
    images: int                       # images this rank embedded per step (the simulated share)
    global_batch: int                 # rows the loss ran over
    peak: int                         # tracked peak, bytes
    at_peak: dict[str, int]           # tracker category -> bytes at that peak
    phase_peak: dict[str, int]        # two_pass_step phase -> the peak reached in it
    phase_start: dict[str, int]       # ... and the memory when it began
    phase_at_peak: dict[str, dict[str, int]]  # ... and the categories at that phase's peak
    at_end: dict[str, int]            # categories after the step (the optimizer's state, no gradients)
    phase_rest: dict[str, int]        # single-device engine: phase -> the peak of all but the model states
    phase_rest_at: dict[str, dict[str, int]]  # ... and the categories then (ZeRO shards the states: estimate.py)
    phase_flops: dict[str, float]     # phase -> FLOPs per step
    sent: dict[str, float]            # collective -> bytes this rank sends per step
    parameters: int                   # the model's parameters (all, unsharded)
    trainable: int
    largest_block: int                # parameters of its largest transformer block
    seconds: float


def simulated_share(share: int, chunk: int) -> int:
    """Images per rank in the simulation: two chunks (one without gradient sync, one with), at most the share."""
    return min(share, 2 * chunk)


class Unhooked:
    """A loss called through its forward, not nn.Module.__call__: the trackers' module hooks would
    put a multi-grad hook on its leaf input, which the two-pass step's autograd.grad cannot run."""

    def __init__(self, loss: nn.Module):
        self.loss = loss
        self.split_across_ranks = getattr(loss, "split_across_ranks", False)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss.forward(embeddings, labels)

    def partial(self, embeddings, labels, part: int, parts: int) -> torch.Tensor:
        return self.loss.partial(embeddings, labels, part, parts)

    def parameters(self):
        return self.loss.parameters()


class RealLoss(Unhooked):
    """The configured loss on real tensors of the shapes it is given (see the module doc); returns a
    fake scalar whose gradient is a fake tensor of the embeddings' shape. `rows` > 0: run the
    real loss at that many rows (the global batch) whatever the simulated gathered size."""

    def __init__(self, loss: nn.Module, rows: int, samples_per_class: int):
        super().__init__(loss)
        self.rows, self.k = rows, samples_per_class
        self.on_peak = lambda nbytes: None  # told the real loss's own peak bytes (_Phases.transient)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _Real.apply(embeddings, self, None)

    def partial(self, embeddings, labels, part: int, parts: int) -> torch.Tensor:
        return _Real.apply(embeddings, self, (part, parts))

    def run(self, rows: int, dim: int, share: tuple[int, int] | None) -> None:
        gen = torch.Generator().manual_seed(0)
        x = nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1).requires_grad_()
        y = torch.arange(rows) // self.k
        with MemTracker() as own:  # x stands for the gathered embeddings, which the rank's tracker holds already
            loss = self.loss.forward(x, y) if share is None else self.loss.partial(x, y, *share)
            torch.autograd.grad(loss, x)
        self.on_peak(_total(own.get_tracker_snapshot("peak")))


class _Real(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, owner: RealLoss, share):
        with unset_fake_temporarily(), torch.enable_grad():
            owner.run(owner.rows or len(embeddings), embeddings.shape[1], share)
        ctx.shape = embeddings.shape
        return embeddings.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape), None, None


class _Phases:
    """two_pass_step's timer: records, per phase, the memory at its start, the tracked peak inside it
    (the tracker's peak is reset to the current total at each phase start: MemTracker keeps it in
    _peak_mem/_peak_mem_snap), memory the tracker cannot see (`transient`) and the FLOPs counted in it."""

    def __init__(self, tracker: MemTracker, flops: FlopCounterMode):
        self.tracker, self.flops = tracker, flops
        self.start: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.at: dict[str, dict[str, int]] = {}
        self.counted: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.overall, self.at_peak = 0, {}
        self.rest: dict[str, int] = {}
        self.rest_at: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        current = self.tracker.get_tracker_snapshot("current")
        self.start[name] = _total(current)
        self.tracker._peak_mem = {dev: snap.get("Total", 0) for dev, snap in current.items()}
        self.tracker._peak_mem_snap = deepcopy(current)
        apart = isinstance(self.tracker, _StatesApart)
        if apart:
            self.tracker.rest = self.tracker.rest_now()
        before = self.flops.get_total_flops()
        self._unseen, self._unseen_rest = (0, {}), (0, {})
        yield
        self.end = _categories(self.tracker.get_tracker_snapshot("current"))
        peak = self.tracker.get_tracker_snapshot("peak")
        total, categories = max((_total(peak), _categories(peak)), self._unseen, key=lambda tc: tc[0])
        if total > self.peak.get(name, -1):
            self.peak[name], self.at[name] = total, categories
        if apart:
            rest, rest_at = max(self.tracker.rest, self._unseen_rest, key=lambda tc: tc[0])
            if rest > self.rest.get(name, -1):
                self.rest[name], self.rest_at[name] = rest, rest_at
        if total > self.overall:
            self.overall, self.at_peak = total, categories
        self.counted[name] += self.flops.get_total_flops() - before

    def transient(self, nbytes: int, label: str = "Loss (real values)") -> None:
        """`nbytes` held for a moment now, outside the tracker's sight (RealLoss's own peak): a peak
        candidate of the current total plus them."""
        current = self.tracker.get_tracker_snapshot("current")
        if _total(current) + nbytes > self._unseen[0]:
            self._unseen = (_total(current) + nbytes, {**_categories(current), label: nbytes})
        if isinstance(self.tracker, _StatesApart):
            rest, rest_at = self.tracker.rest_now()
            if rest + nbytes > self._unseen_rest[0]:
                self._unseen_rest = (rest + nbytes, {**rest_at, label: nbytes})


def _categories(snapshot: dict) -> dict[str, int]:
    return {str(getattr(k, "value", k)): v for snap in snapshot.values() for k, v in snap.items() if k != "Total"}


def _total(snapshot: dict) -> int:
    return sum(snap.get("Total", 0) for snap in snapshot.values())


MODEL_STATES = ("Parameter", "Gradient", "Optstate")  # MemTracker's categories of parameters, gradients, AdamW state


class _StatesApart(MemTracker):
    """MemTracker that also keeps the peak of everything but the model states (`rest`: bytes, categories).
    ZeRO shards the states, so its peak is another moment of the step than the single-device engine's
    (whose whole gradients peak at the end of the backward): estimate.py adds DeepSpeed's states to this."""

    def __init__(self):
        super().__init__()
        self.rest: tuple[int, dict[str, int]] = (0, {})

    def rest_now(self) -> tuple[int, dict[str, int]]:
        rest = {k: v for k, v in _categories(self.get_tracker_snapshot("current")).items() if k not in MODEL_STATES}
        return sum(rest.values()), rest

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        now = self.rest_now()
        if now[0] > self.rest[0]:
            self.rest = now


class _WholeStep:
    """FlopCounterMode's module tracker replaced by one that knows only "Global" (the total is all the
    plan reads). Its own ModuleTracker registers a multi-grad hook on each module's outputs and keeps
    every handle until the counter exits; the hooks it registers while activation checkpointing
    recomputes a block in the backward keep that recomputation's activations alive, so under the
    counter a checkpointed step peaks (and enters its optimizer) as if nothing were checkpointed, in a
    real run as in a fake one (tests/test_plan.py measures both)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts the whole step without tracking modules (see _WholeStep)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _WholeStep()
    return counter


class _NoHook:
    def remove(self) -> None:
        pass


def skip_frozen(tracker: MemTracker, model: nn.Module) -> None:
    """The trackers hook every parameter's gradient when its module runs, which a frozen parameter
    refuses (LoRA's base, model.trainable_blocks): those are marked as hooked already (before each
    `with tracker`, whose exit forgets the marks). A frozen parameter is then counted as a weight
    only: no gradient, no optimizer state."""
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())


class _ResetEachCall:
    """engine.model, resetting the tracker's per-module statistics before each call: the trackers
    refuse a root module called more than once per iteration, and the two-pass step calls it once per
    chunk and pass (the overall peak is kept)."""

    def __init__(self, model, tracker: MemTracker):
        self._model, self._tracker = model, tracker

    def __call__(self, *args, **kwargs):
        self._tracker.reset_mod_stats()
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _Traffic:
    """Counts the bytes rank 0 sends per collective, by wrapping torch.distributed's functions
    (FSDP2 and the two-pass step call them; DDP's reducer calls the process group from C++ and is
    counted in closed form by estimate.py)."""

    def __init__(self, world: int):
        self.world, self.sent, self._inside = world, {}, False

    def _wrap(self, fn, name: str):
        kind = COLLECTIVES[name]

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if not self._inside:  # keyed by function: FSDP2 calls the *_single ones, the two-pass step the others
                self.sent[name] = self.sent.get(name, 0.0) + self._bytes(kind, [*args, *kwargs.values()])
            self._inside, outer = True, self._inside
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = outer
        return counted

    def _bytes(self, kind: str, args) -> float:
        """The gathered or reduced size: the largest tensor (or list of them) among the arguments."""
        size = max((sum(t.numel() * t.element_size() for t in (a if isinstance(a, (list, tuple)) else [a])
                        if isinstance(t, torch.Tensor)) for a in args), default=0)
        share = (self.world - 1) / self.world
        return {"all_reduce": 2 * share * size, "broadcast": size}.get(kind, share * size)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        try:
            for name, fn in saved.items():
                setattr(dist, name, self._wrap(fn, name))
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)


@contextlib.contextmanager
def fake_group(world_size: int) -> Iterator[None]:
    """A fake process group of `world_size` ranks, this process rank 0 (nothing is sent anywhere)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if distributed.initialized():
        raise RuntimeError("the plan simulates its own process group; a real one is already there")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _real_mesh(fake: FakeTensorMode | None) -> Iterator[None]:
    """The device mesh made on real tensors (it reads its rank map with .tolist())."""
    import torch.distributed.device_mesh as device_mesh

    saved = device_mesh.init_device_mesh

    def init_device_mesh(*args, **kwargs):
        with unset_fake_temporarily() if fake else contextlib.nullcontext():
            return saved(*args, **kwargs)

    try:
        device_mesh.init_device_mesh = init_device_mesh
        yield
    finally:
        device_mesh.init_device_mesh = saved


def as_on_gpu(cfg: Config, parallel) -> tuple[str, object]:
    """(train.precision, parallel) as a GPU run resolves them (pipeline/parallel/precision.py, on a CUDA
    device), given to the engine explicitly: on the CPU device it then runs bf16 CPU autocast and
    FSDP2's MixedPrecisionPolicy as it would CUDA's. train.precision=fp32 (recipe=rsk) keeps fp32
    weights under every backend, as the run does."""
    gpu = torch.device("cuda")
    param_dtype = resolve_param_dtype(cfg.parallel.param_dtype, cfg.parallel.name, cfg.train.precision, gpu)
    return resolve(cfg.train.precision, gpu), dataclasses.replace(parallel, param_dtype=param_dtype)


def _parameters(model: nn.Module) -> tuple[int, int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = engines.transformer_blocks(model)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=total)
    return total, trainable, largest


def simulate(cfg: Config, chunk: int, fake: bool = True, steps: int = 2, backend: str | None = None,
             loss_rows: int | None = None) -> Measurement:
    """Two finetune steps of rank 0 at the chunk size `chunk`, over the process group in place (a
    fake_group for the plan). backend: the engine to run (default parallel.name; estimate.py runs
    zero* as `none`, for the activations only). loss_rows: rows of the real loss (default: the
    global batch; 0: the gathered simulated rows)."""
    tic = time.perf_counter()
    world, t = distributed.world_size(), cfg.train
    share = simulated_share(t.global_batch // world, chunk)
    parallel = dataclasses.replace(cfg.parallel, name=backend or cfg.parallel.name)
    if fake and engines.ENGINES[parallel.name] is engines.DDPEngine:  # DDP's C++ reducer cannot run on fake tensors: estimate.py adds its buckets
        parallel = dataclasses.replace(parallel, name="none")
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    build = dataclasses.replace(cfg.model, pretrained=None)  # the shapes, not the weights
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = build_encoder(build, cfg.seed)
    counts = _parameters(model)
    loss = RealLoss(build_loss(cfg.loss, t, list(range(t.global_batch // t.samples_per_class)), model.dim, cfg.seed),
                    t.global_batch if loss_rows is None else loss_rows, t.samples_per_class)
    traffic = _Traffic(world)
    precision, parallel = as_on_gpu(cfg, parallel)
    with mode or contextlib.nullcontext(), _real_mesh(mode):
        model = model.to_empty(device="cpu").train() if fake else model.train()
        engine = engines.build_engine(model, lambda m: build_optimizer(m, t, 1), parallel, chunk,
                                      torch.device("cpu"), t.grad_clip, precision)
        images = torch.zeros(share, 3, cfg.model.image_size, cfg.model.image_size)
        labels = torch.arange(share) // t.samples_per_class
        if isinstance(engine, engines.FSDP2Engine):
            tracker = FSDPMemTracker(engine.module, engine.optimizer)
            tracker.track_inputs((images, labels))
        else:
            tracker = _StatesApart()
            tracker.track_external(engine.module, engine.optimizer, images, labels)
        engine.model = _ResetEachCall(engine.model, tracker)
        flops = flop_counter()
        step_loss = loss if fake else Unhooked(loss.loss)  # for real: the loss itself, on the real embeddings
        for step in range(steps):
            phases, traffic.sent = _Phases(tracker, flops), {}  # the last step's figures are kept
            loss.on_peak = phases.transient
            skip_frozen(tracker, engine.module)
            with tracker, flops, traffic.counting():
                set_step(loss.loss, step)
                two_pass_step(engine, images, labels, step_loss, chunk, cfg.seed, step, phases)
    return Measurement(world, chunk, share, loss.rows or world * share, phases.overall, phases.at_peak,
                       phases.peak, phases.start, phases.at, phases.end, phases.rest, phases.rest_at, phases.counted,
                       traffic.sent, *counts, time.perf_counter() - tic)
