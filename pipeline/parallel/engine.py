"""One interface over the training backends: forward precision, backward, gradient sync, step, save, load.

    parallel=none     one process, one device
    parallel=ddp      torch DistributedDataParallel: replicated weights, gradients all-reduced
    parallel=zero1-3  DeepSpeed ZeRO (ds_configs/<name>.json): optimizer state / gradients / weights sharded
    parallel=fsdp2    torch fully_shard on each transformer block, then the root: everything sharded

The two-pass step talks only to this interface, and backend differences live here and nowhere
else. `engine.backward(x)` takes this rank's share of a sum over ranks: the global loss's gradient
is the sum of the ranks' contributions, while DDP, ZeRO and FSDP2 average gradients over ranks,
so those engines multiply by the world size first.

`engine.step()` clips the gradients to a global 2-norm of `grad_clip` (0: no clipping) and keeps the
norm before clipping in `engine.grad_norm` (a tensor, read without a sync until logged), the same
under every backend: torch's clipping on whole gradients (none, DDP) or on FSDP2's DTensor shards,
DeepSpeed's own `gradient_clipping` under ZeRO.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from pipeline.config import ParallelConfig
from pipeline.config.backends import DEEPSPEED, backend
from pipeline.errors import UserError
from pipeline.parallel import checkpoint, distributed, host_memory, zero_universal
from pipeline.parallel.precision import DTYPES, autocast, resolve, resolve_param_dtype

REPO = Path(__file__).resolve().parents[2]  # the repository root (ds_configs/ lives there)
log = logging.getLogger(__name__)
DEPRECATED_COLLECTIVES = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
                          r"_reduce_scatter_base)` is")

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler
OptimizerFactory = Callable[[nn.Module], "tuple[Optimizer, Scheduler]"]


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """The 2-norm of all the gradients together, before clipping; when max_norm > 0 the gradients are
    scaled by max_norm / (norm + 1e-6) if that is below 1 (torch's rule; DeepSpeed's differs by
    1e-6 relative). FSDP2's gradients are DTensor shards: their norm is a DTensor, made whole with
    one all-reduce (full_tensor), as torchtitan does."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


class Engine:
    """Single process, one device. Checkpoints through torch.distributed.checkpoint."""

    checkpoint_format = "dcp"

    def __init__(self, model: nn.Module, optimizer: Optimizer, scheduler: Scheduler, device: torch.device,
                 grad_clip: float = 0.0, precision: str = "auto"):
        self.module = model   # the bare model: parameters and state dicts
        self.model = model    # what the forward calls: a wrapper under DDP and DeepSpeed
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.grad_clip = grad_clip
        self.precision = precision  # train.precision (pipeline/parallel/precision.py)
        self.grad_norm = torch.tensor(float("nan"))  # of the last step, before clipping

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Backward passes inside with enabled=False accumulate without communication."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.grad_norm = clip_gradients(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on rank 0 (collective; with a process group the others
        get {}: `cpu_offload` gathers to rank 0 alone)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          broadcast_from_rank0=False))

    def save(self, folder: Path) -> None:
        """Collective: every rank calls it with the same folder."""
        checkpoint.save_dcp(folder, self.module, self.optimizer, self.scheduler)

    def load(self, folder: Path) -> None:
        checkpoint.load_dcp(folder, self.module, self.optimizer, self.scheduler)

    def load_weights(self, folder: Path) -> None:
        """The model's weights alone from one of this engine's checkpoints; the optimizer's state and the
        schedule stay (collective; DCP reshards FSDP2's parameters)."""
        checkpoint.load_dcp(folder, self.module)


class DDPEngine(Engine):
    """Replicated weights; the gradients are all-reduced once, in the backward of the last chunk."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, scheduler: Scheduler, device: torch.device,
                 grad_clip: float = 0.0, precision: str = "auto"):
        super().__init__(model, optimizer, scheduler, device, grad_clip, precision)
        from torch.nn.parallel import DistributedDataParallel

        self.model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        with contextlib.nullcontext() if enabled else self.model.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss * distributed.world_size()).backward()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks: the longest ModuleList/Sequential whose children share one class
    (timm `blocks`, open_clip `resblocks`, transformers `layer`)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            if len(children) > len(best) and len({type(c) for c in children}) == 1:
                best = children
    return best


class FSDP2Engine(Engine):
    """Weights, gradients and optimizer state sharded over the ranks (torch fully_shard); each block's
    weights are gathered for its forward and backward, and gradients reduce-scattered on the last chunk.

    fully_shard goes on each transformer block, then on the root, so that only one block's full
    weights exist at a time. It composes with timm's (non-reentrant) activation checkpointing: the
    recomputed block forward gathers the block's weights again.

    param_dtype bf16 (parallel.param_dtype): the fp32 shards (what the optimizer steps and the
    checkpoint holds) are gathered as bf16 copies, torchtitan's and DINOv2's policy, halving the
    all-gather traffic and the gathered block's memory; gradients are reduce-scattered in fp32."""

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, device: torch.device,
                 reshard_after_forward: bool, grad_clip: float = 0.0, precision: str = "auto",
                 param_dtype: str = "fp32"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        super().__init__(model, *make_optimizer(model), device, grad_clip, precision)  # the optimizer holds the sharded parameters

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * distributed.world_size()).backward()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1/2/3 around our optimizer and scheduler (DeepSpeed steps both).

    The step's chunks are DeepSpeed micro-batches of one accumulation: the boundary is False for all
    but the last chunk, so ZeRO-1 reduces once per step; ZeRO-2/3 reduce-scatter every chunk's
    gradients into the owning rank's partition (that is how they keep gradients sharded, and why
    DeepSpeed refuses `no_sync` there) and finish at the boundary. A bf16 forward is the same autocast
    as every other backend's, written into DeepSpeed's config as well (`torch_autocast`, see
    `deepspeed_config`): without it DeepSpeed switches an outer CUDA autocast off inside its forward.
    parallel.param_dtype=bf16 adds DeepSpeed's bf16 mode (bf16 weights, fp32 master weights in the
    optimizer, so checkpoints consolidate to fp32). Clipping is
    DeepSpeed's (`gradient_clipping` in the config, from train.grad_clip): it alone sees the
    partitioned gradients whole."""

    checkpoint_format = "deepspeed"
    TAG = "zero"  # the checkpoint's sub-folder

    def __init__(self, model: nn.Module, optimizer: Optimizer, scheduler: Scheduler, device: torch.device,
                 config: dict, precision: str = "auto"):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines drown the training log
        # DeepSpeed's own collectives call the names torch 2.13 deprecated (ours use the current ones).
        warnings.filterwarnings("ignore", category=FutureWarning, message=DEPRECATED_COLLECTIVES)
        super().__init__(model, optimizer, scheduler, device, precision=precision)
        _skip_shm_inference_op()
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=config)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        self.model.set_gradient_accumulation_boundary(enabled)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # Not divided by the accumulation steps: each chunk adds its own part of the global gradient.
        self.model.backward(loss * distributed.world_size(), scale_wrt_gas=False)

    def step(self) -> None:
        self.model.step()  # clipping, optimizer, scheduler, zero_grad
        norm = self.model.get_global_grad_norm()  # over all partitions, before clipping
        self.grad_norm = torch.as_tensor(float("nan") if norm is None else norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights on rank 0 (collective; the others get {}), gathered one tensor at a time: the
        whole model at once would sit on every rank twice (the gathered weights and their copy),
        8 GB per rank for a ViT-g/14 on top of the 9 GB its ZeRO-3 rank already holds on the CPU
        (BENCHMARKS.md, issue 26). Under DeepSpeed's bf16 mode (parallel.param_dtype=bf16) the module holds bf16
        copies, and the trained weights are the optimizer's fp32 masters."""
        main = distributed.rank() == 0
        state = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            full = self._gathered(value)
            if main:
                state[name] = full.float() if full.dtype == torch.bfloat16 else full
        return state

    def _gathered(self, value: torch.Tensor) -> torch.Tensor:
        """One tensor whole, on the CPU (collective under ZeRO-3, where a parameter holds only its part)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        if self.model.bfloat16_enabled() and isinstance(value, nn.Parameter) and value.requires_grad:
            return safe_get_full_fp32_param(value).detach().cpu().clone()
        with deepspeed.zero.GatheredParameters([value] if hasattr(value, "ds_id") else []):  # no-op below ZeRO-3
            return value.detach().cpu().clone()

    def save(self, folder: Path) -> None:
        # A LoRA model's frozen base is left out, as under DCP: it is rebuilt from the config.
        self.model.save_checkpoint(str(folder), tag=self.TAG,
                                   exclude_frozen_parameters=checkpoint.only_what_trains(self.module))

    def load(self, folder: Path) -> None:
        # Not strict for a LoRA model: its frozen base is not in the file (meta.json has matched the model).
        path, _ = self.model.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True,
                                             load_module_strict=not checkpoint.only_what_trains(self.module))
        if path is None:
            raise UserError(f"checkpoint {folder} has no DeepSpeed state; use another run_dir, or force=true to start over")

    def load_weights(self, folder: Path) -> None:
        """The model's weights alone (collective): the fp32 weights consolidated from the checkpoint's
        partitions (DeepSpeed's zero_to_fp32, read on every rank) are written into the module's parameters
        (under ZeRO-3 gathered, written on rank 0 and partitioned again), then into the optimizer's fp32
        partitions (`refresh_fp32_params`, as DeepSpeed's own load_module_only does); its moments stay."""
        import deepspeed

        weights = checkpoint.read_weights(folder)
        checkpoint.check_complete(self.module, weights)
        with torch.no_grad():
            for name, value in self.module.state_dict(keep_vars=True).items():
                if name not in weights:  # a LoRA model's frozen base (check_complete: only that)
                    continue
                with deepspeed.zero.GatheredParameters([value] if hasattr(value, "ds_id") else [], modifier_rank=0):
                    if not hasattr(value, "ds_id") or distributed.rank() == 0:
                        value.data.copy_(weights[name])
        self.optimizer.refresh_fp32_params()

    def load_resharded(self, folder: Path, written_by: int) -> None:
        """A checkpoint written by another number of processes: converted once to a universal
        checkpoint (rank 0, the others wait), then sliced for this world size by DeepSpeed's
        universal loading, optimizer state included."""
        stage = self.model.zero_optimization_stage()
        log.info("%s was written by %d processes, resuming on %d: converting it to a DeepSpeed universal checkpoint "
                 "(ZeRO-%d, in %s/)", folder.name, written_by, distributed.world_size(), stage, zero_universal.FOLDER)
        distributed.on_main(lambda: zero_universal.convert(folder, self.TAG))
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        config = self.model._config  # read on every load; DeepSpeed has no argument for it
        config.load_universal_checkpoint = True
        try:
            self.load(folder / zero_universal.FOLDER)
        finally:
            config.load_universal_checkpoint = False
        if stage == 3:
            self._repair_zero3_universal_load(settings)

    def _repair_zero3_universal_load(self, settings: list[dict]) -> None:
        """Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load, both harmless with one parameter
        group and both wrong with ours (the head's learning rate, no decay on norms and biases):
        every group gets the first group's settings, and all groups share ONE Adam step tensor,
        which each group's step then increments in place (so the bias correction runs ahead)."""
        for group, saved, lr in zip(self.optimizer.param_groups, settings, self.scheduler.get_last_lr()):
            group.update(saved, lr=lr)
        for state in self.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def deepspeed_config(cfg: ParallelConfig, chunk_size: int, device: torch.device, grad_clip: float = 0.0,
                     precision: str = "auto") -> dict:
    """The JSON's ZeRO settings, plus the batch sizes DeepSpeed checks (one chunk per micro-batch), the
    clipping of train.grad_clip and the precision (`precision_sections`)."""
    path = Path(cfg.deepspeed_config or f"ds_configs/{cfg.name}.json").expanduser()
    path = path if path.is_absolute() or path.exists() else REPO / path
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; set parallel.deepspeed_config to a JSON file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({e})") from None
    if device.type == "cpu" and config.get("zero_optimization", {}).get("offload_optimizer"):
        config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    if config.get("gradient_clipping", 0.0) not in (0.0, grad_clip):
        raise UserError(f"{path} sets gradient_clipping={config['gradient_clipping']}; set train.grad_clip instead "
                        f"(the same clipping under every backend) and leave it 0 in the JSON")
    for key in ("bf16", "fp16", "torch_autocast", "communication_data_type"):
        if key in config:
            raise UserError(f"{path} sets {key}; set train.precision and parallel.param_dtype instead "
                            f"(the same precision under every backend) and leave it out of the JSON")
    return {**config, "train_micro_batch_size_per_gpu": chunk_size, "gradient_accumulation_steps": 1,
            "train_batch_size": chunk_size * distributed.world_size(), "gradient_clipping": grad_clip,
            **precision_sections(resolve(precision, device), resolve_param_dtype(cfg.param_dtype, cfg.name, precision, device))}


def precision_sections(forward: str, param_dtype: str) -> dict:
    """DeepSpeed's own precision settings for a forward in `forward` and weights in `param_dtype`
    ('bf16' | 'fp32'). DeepSpeed 0.19.8 runs every forward inside `autocast_if_enabled`
    (runtime/torch_autocast.py), which turns an outer CUDA autocast OFF unless the config has an
    enabled `torch_autocast` section; with one it enters that autocast itself. Its
    `lower_precision_safe_modules` is empty so that no parameter is tagged to reduce its gradient
    in bf16. bf16 weights are DeepSpeed's bf16 mode, gradients still reduced in fp32."""
    sections: dict = {}
    if forward == "bf16":
        sections["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if param_dtype == "bf16":
        sections.update(bf16={"enabled": True}, communication_data_type="fp32")
    return sections


def check_launcher(name: str, env=os.environ) -> None:
    """`accelerate launch` with a DeepSpeed or FSDP config only starts the processes: the backend is
    parallel=..., so a config file that says otherwise is a mistake worth one line."""
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true" and not backend(name).deepspeed:
        raise UserError(f"accelerate launched with a DeepSpeed config but parallel={name}; add parallel=zero1|zero2|zero3")
    if env.get("ACCELERATE_USE_FSDP") == "true" and ENGINES[name] is not FSDP2Engine:
        raise UserError(f"accelerate launched with an FSDP config but parallel={name}; add parallel=fsdp2")


def build_engine(model: nn.Module, make_optimizer: OptimizerFactory, cfg: ParallelConfig, chunk_size: int,
                 device: torch.device, grad_clip: float = 0.0, precision: str = "auto") -> Engine:
    """The engine for `parallel=<cfg.name>`; `make_optimizer(model)` gives the optimizer and scheduler
    (called after sharding where the backend replaces the parameters); `grad_clip`: see the module doc;
    `precision`: train.precision (cfg.param_dtype for the sharded backends: pipeline/parallel/precision.py)."""
    cfg.check()  # for callers that built the config by hand (load_config checked it already)
    check_launcher(cfg.name)
    kind, facts = ENGINES[cfg.name], backend(cfg.name)
    if facts.many_processes:
        distributed.ensure_group(device)
    if device.type == "cpu" and facts.gathers_weights:  # gathered blocks freed among live ones: host_memory.py
        host_memory.return_freed_tensors()
    if kind is FSDP2Engine:  # shards first, then the optimizer over the sharded parameters
        return FSDP2Engine(model, make_optimizer, device, cfg.fsdp_reshard_after_forward, grad_clip, precision,
                           resolve_param_dtype(cfg.param_dtype, cfg.name, precision, device))
    if kind is DeepSpeedEngine:
        config = deepspeed_config(cfg, chunk_size, device, grad_clip, precision)
        return DeepSpeedEngine(model, *make_optimizer(model), device, config, precision)
    return kind(model, *make_optimizer(model), device, grad_clip, precision)


# parallel.name -> its engine: the backends' facts are pipeline/config/backends.py's table.
ENGINES = {"none": Engine, "ddp": DDPEngine, "fsdp2": FSDP2Engine, **dict.fromkeys(DEEPSPEED, DeepSpeedEngine)}


def _skip_shm_inference_op() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory all-reduce (`deepspeed_shm_comm`, about 35 s
    of gcc at a checkout's first run) when its communication backend starts, for `inference_all_reduce`
    alone (tensor-parallel inference), which training never calls. Marked incompatible it is not built,
    and every collective goes through torch.distributed as before. No effect on other accelerators,
    which have no such op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

