"""Checkpoints written by one number of processes and resumed by another, through pipeline.parallel.checkpoint,
for tests/test_resharding.py. AdamW (the pipeline's optimizer, whose moments must survive the
resharding), in the pipeline's parameter groups, with its step-dependent learning rate (the
scheduler's position must survive too).

    torchrun --nproc_per_node 2 tests/resharding_worker.py OUT write fsdp2,zero2,zero3@frozen_ckpt
        per job (<backend> or <backend>@<variant of parallel_worker.problem>): two steps, a
        checkpoint in OUT/<job>/, the full state after it, then a third step;
    torchrun --nproc_per_node 1 tests/resharding_worker.py OUT resume fsdp2:none,zero2:zero2
        loads OUT/<written>/'s checkpoint under <backend>, the full state after the load, the third step.

"Full state": every parameter's weights and Adam moments, gathered whole on rank 0, whatever the
backend (a backend-independent picture to compare a resharded load against).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel_worker import CHUNK, GLOBAL, SEED, problem  # noqa: E402

from pipeline.config import ParallelConfig, TrainConfig  # noqa: E402
from pipeline.parallel import (
    checkpoint,
    distributed,  # noqa: E402
)
from pipeline.parallel.distributed import world_from_env  # noqa: E402
from pipeline.parallel.engine import build_engine  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.two_pass import two_pass_step  # noqa: E402

WRITTEN_STEPS, LR = 2, 1e-3


def adamw(model: torch.nn.Module):
    """The pipeline's optimizer: AdamW in 4 parameter groups (head or not, decay or not), warmup, cosine."""
    return build_optimizer(model, TrainConfig(lr=LR, head_lr=10 * LR, warmup_steps=2, max_steps=5))


def full_state(engine) -> dict:
    """Weights and Adam moments of every parameter, whole, on rank 0, and the parameter groups'
    learning rates and weight decays (collective)."""
    moments = ("exp_avg", "exp_avg_sq")
    if engine.checkpoint_format == "deepspeed":
        from deepspeed.utils import safe_get_full_optimizer_state

        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
            # ZeRO-1/2 link each parameter to its Adam state after the first group's first step, so
            # the other groups' parameters show none (DeepSpeed 0.19.8): link them again.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        optim = {name: {k: safe_get_full_optimizer_state(p, k).cpu().clone() for k in moments}
                 for name, p in engine.module.named_parameters() if p.requires_grad}
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(engine.module, engine.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = state.get("state", {})  # rank 0's alone with cpu_offload
        optim = {name: {k: s[k] for k in moments} for name, s in state.items()}
    groups = [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups]
    return {"weights": engine.full_state_dict(), "optim": optim, "groups": groups}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: 4 classes x 4 images."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL, 3, 32, 32, generator=gen), torch.arange(4).repeat_interleave(4)[torch.randperm(GLOBAL, generator=gen)]


def train(engine, batches, loss_fn, steps: range) -> None:
    world = world_from_env()
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    for step in steps:
        images, labels = batches[step]
        two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, step)


def engine_for(backend: str, variant: str):
    model, _, loss_fn = problem(variant)
    batches = [batch(step) for step in range(WRITTEN_STEPS + 1)]
    return build_engine(model, adamw, ParallelConfig(name=backend), CHUNK, torch.device("cpu")), batches, loss_fn


def write(out: Path, job: str) -> None:
    """job: <backend>, or <backend>@<variant> (parallel_worker.problem's variants)."""
    backend, _, variant = job.partition("@")
    engine, batches, loss_fn = engine_for(backend, variant or "plain")
    train(engine, batches, loss_fn, range(WRITTEN_STEPS))
    checkpoint.save(out / job, WRITTEN_STEPS, engine, {"model": {}, "parallel": backend}, keep=1)
    save_on_main(full_state(engine), out / job / "written.pt")  # now: some tensors may alias live state
    train(engine, batches, loss_fn, range(WRITTEN_STEPS, WRITTEN_STEPS + 1))
    save_on_main(engine.full_state_dict(), out / job / "straight.pt")


def resume(out: Path, written: str, backend: str) -> None:
    engine, batches, loss_fn = engine_for(backend, written.partition("@")[2] or "plain")
    meta = checkpoint.load(checkpoint.latest(out / written), engine, expect_model={}, parallel=backend)
    name = f"{backend}-{distributed.world_size()}"
    save_on_main(full_state(engine), out / written / f"loaded-{name}.pt")
    train(engine, batches, loss_fn, range(meta["step"], meta["step"] + 1))
    save_on_main(engine.full_state_dict(), out / written / f"continued-{name}.pt")


def save_on_main(state: dict, path: Path) -> None:
    if distributed.rank() == 0:
        torch.save(state, path)


def main(out: Path, mode: str, jobs: list[str]) -> None:
    distributed.init(world_from_env(), torch.device("cpu"))
    for job in jobs:
        if mode == "write":
            write(out, job)
        else:
            resume(out, *job.split(":"))
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))
