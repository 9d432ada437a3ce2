"""Who am I, and the process group: rank, world size and local device from torchrun / accelerate
(RANK, WORLD_SIZE, LOCAL_RANK) or from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
rendezvous on the job's first node, at a port derived from the job id).

Every process-group call in the project goes through here, so the rest of the code never asks
whether it runs in one process or many.

Timeouts: a collective that gets no answer within `parallel.timeout` seconds (default: the
backend's own, 30 min for gloo, 10 min for NCCL) fails, so a hung or lost rank ends the job
instead of holding it until its time limit. Waiting for rank 0's own work (`on_main`: sharding a
dataset, converting or exporting a checkpoint) is not a hang and may take hours: there the other
ranks wait for a key that rank 0 sets in the process group's store (up to WAIT), and rank 0, which
never waits on them there, meets them in a collective only afterwards.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

# Before torch loads OpenMP (read once, at load): OpenMP threads that wait for work sleep instead of
# spinning, so on a machine whose cores are busy with other work the process's threads do not spin
# against it (a finetune step of the tiny ViT, 2 threads on a 2-core machine at load 9: 31 s spinning,
# 11 s passive, 11 s with 1 thread; the same losses). The user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d

from pipeline.errors import UserError

T = TypeVar("T")

# torch 2.13 deprecates reduce_scatter_tensor (a FutureWarning per call) for reduce_scatter_single.
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Ranks that wait for rank 0 (sharding a large dataset, say) wait this long before giving up.
WAIT = timedelta(hours=6)
_timeout: timedelta | None = None  # parallel.timeout, for the error message
_waits = 0  # on_main calls so far: each has its own key in the store
_alone_threads: int | None = None  # torch's threads for rank 0's own work (set_threads), None: unchanged


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env=os.environ) -> World:
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def launcher_mismatch(world: World, env=os.environ) -> list[str]:
    """One warning line when the launcher was asked for more processes than the world has: e.g.
    `accelerate launch --num_processes 2` without `--multi_gpu` runs one plain process (accelerate sets
    MASTER_PORT for several processes but no WORLD_SIZE)."""
    asked = int(env.get("ACCELERATE_NUM_PROCESSES") or 0)
    accelerate_several = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env
    if asked > world.size or (world.size == 1 and accelerate_several):
        wanted = f"{asked} processes" if asked > world.size else "several processes"
        return [f"the launcher was asked for {wanted} but this is rank {world.rank} of {world.size}: add --multi_gpu "
                f"to accelerate launch (or use torchrun --nproc_per_node N); see docs/parallel.md"]
    return []


def pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device=cuda but no GPU is visible: {cuda_versions()}; use device=cpu or device=auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", world.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def cuda_versions() -> str:
    """torch's CUDA and, where nvidia-smi answers, the driver's: a driver older than torch's CUDA is the usual
    reason a GPU node shows no GPU to torch (the +cu130 wheels need a driver of the R580 series or newer)."""
    built = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is a CPU-only build")
    driver, cuda = nvidia_driver()
    if driver is None:
        return f"{built}; nvidia-smi does not answer (no NVIDIA driver or GPU on this node)"
    return f"{built}; nvidia-smi: driver {driver}" + (f", which runs CUDA up to {cuda}" if cuda else "")


def nvidia_driver() -> tuple[str | None, str | None]:
    """(the NVIDIA driver's version, the newest CUDA it runs) as nvidia-smi prints them; None where it
    does not answer."""
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        smi = ""
    found = (re.search(rf"{key} Version:\s*(\S+)", smi) for key in ("Driver", "CUDA"))
    return tuple(m.group(1) if m else None for m in found)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, e.g. 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for i in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{i:0{len(first)}d}")
    return hosts


def slurm_rendezvous(env=os.environ) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT for an srun job: its first host, and a port from the job id
    (so two jobs sharing a node do not collide)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    if shutil.which("scontrol"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True).stdout.split()
    else:
        hosts = []
    first = hosts[0] if hosts else expand_nodelist(nodelist)[0]
    return first, str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def init(world: World, device: torch.device, timeout: float | None = None) -> None:
    """Join the process group when launched as several processes: NCCL on GPUs, gloo on CPUs.
    `timeout` (seconds, parallel.timeout) bounds every collective; None keeps the backend's own.

    RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous are exported too, for the libraries that read
    them (DeepSpeed would otherwise go looking for MPI under srun)."""
    global _timeout
    set_threads(device)
    if device.type == "cuda":  # one process too: Triton, faiss and NCCL take the current device, not the tensors'
        torch.cuda.set_device(device)
    if world.size == 1 or initialized():
        return
    if "MASTER_ADDR" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = slurm_rendezvous()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    _export(world)
    _timeout = None if timeout is None else timedelta(seconds=timeout)
    if _timeout is not None:
        # The groups that libraries make later (DeepSpeed's data-parallel group, a device mesh's)
        # take torch's module default rather than the world group's timeout: set that too.
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = _timeout
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                            world_size=world.size, timeout=_timeout)


def threads_per_process(env=os.environ) -> int | None:
    """Torch's CPU threads for this process: the cores it may use shared among the processes of its node
    (torchrun's LOCAL_WORLD_SIZE, Slurm's --cpus-per-task); None where OMP_NUM_THREADS says already."""
    if "OMP_NUM_THREADS" in env:
        return None
    if "SLURM_CPUS_PER_TASK" in env:
        return int(env["SLURM_CPUS_PER_TASK"])
    return max(1, len(os.sched_getaffinity(0)) // int(env.get("LOCAL_WORLD_SIZE", 1)))


def set_threads(device: torch.device) -> None:
    """The one place the project decides torch's CPU threads (a GPU run's CPU threads only feed it, but
    rank 0's own work on a GPU node gets the node's: main_rank_threads)."""
    global _alone_threads
    threads = threads_per_process()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    _alone_threads = main_rank_threads() if device.type == "cuda" else None


def main_rank_threads(env=os.environ) -> int:
    """Threads for the work rank 0 does alone on a GPU node while the other ranks sleep (on_main: faiss
    scoring, results, exports): its launcher's allotment (Slurm's --cpus-per-task, else this process's
    CPU affinity), not the one thread per rank of torchrun's and accelerate's OMP_NUM_THREADS=1. CPU runs
    keep their share: their threads are the work, and a different count would change float sums."""
    if "SLURM_CPUS_PER_TASK" in env:
        return int(env["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def alone_threads():
    """torch's threads while rank 0 works alone (faiss follows torch's: pipeline/eval/faiss_device.py)."""
    if _alone_threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(_alone_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cpu_threads() -> int:
    return torch.get_num_threads()


def ensure_group(device: torch.device) -> None:
    """A process group even in one process (DDP, FSDP2 and DeepSpeed need one): an in-memory
    store, so no port is taken."""
    if initialized():
        return
    _export(World())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def _export(world: World) -> None:
    for key, value in (("RANK", world.rank), ("WORLD_SIZE", world.size), ("LOCAL_RANK", world.local_rank)):
        os.environ.setdefault(key, str(value))


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (same shape on all), concatenated in rank order along the first axis.
    No gradient flows through it: the two-pass step differentiates the loss itself, not the gather."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's tensor (same shape on all), on every rank."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def reduce_scatter_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rank r's contiguous share of the rows of the sum over ranks of every rank's (N, ...) tensor
    (N divisible by the world size): one reduce-scatter, each rank receives N / world_size rows."""
    if world_size() == 1:
        return tensor
    share = tensor.new_empty(len(tensor) // world_size(), *tensor.shape[1:])
    REDUCE_SCATTER(share, tensor.contiguous())
    return share


def shutdown(together: bool = True) -> None:
    """Leave the group together: a rank that tears gloo down while another still talks to it can abort.
    together=False after a failed collective: the group is broken, and waiting on it would hang."""
    if initialized() and together:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank already failed; nothing left to wait for
            pass
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (one all-reduce of a single number)."""
    if not initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def broadcast_object(value: Any) -> Any:
    """Rank 0's value, on every rank (so all ranks take the same decision)."""
    if not initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 while the other ranks wait; every rank gets its result (so it must pickle),
    and an error on rank 0 is raised on every rank."""
    global _waits
    result, error = None, None
    if not initialized() or dist.get_rank() == 0:
        try:
            with alone_threads():
                result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
    if initialized():  # the long wait, on the store: rank 0 only sets the key, whatever the others do
        _waits += 1
        key, store = f"pipeline/on_main/{_waits}", c10d._get_default_store()
        if dist.get_rank() == 0:
            store.set(key, "done")
        else:
            try:
                store.wait([key], WAIT)
            except dist.DistStoreError:
                raise UserError(f"rank 0 did not finish its own part within {WAIT}; see its log") from None
    result, failed = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed is not None:
        raise UserError(f"rank 0 failed ({failed}); see its log")
    return result


def communication_failure(error: BaseException) -> str | None:
    """One line saying what went wrong if `error` is a collective that failed (no answer within the
    timeout, or a peer gone), else None. Gloo raises plain RuntimeErrors, NCCL DistBackendErrors."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text.lower())):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text)  # the C++ source location gloo puts first
    detail = re.split(r"\.\s", detail)[0]  # its first sentence (gloo goes on with advice)
    if "timed out" in text.lower() or "timeout" in text.lower():
        waited = f"{_timeout.total_seconds():g} s (parallel.timeout)" if _timeout else "the backend's timeout"
        return (f"a collective got no answer within {waited}: another rank is hung or gone ({detail}); "
                f"run the same command again to resume from the last checkpoint")
    return (f"a collective failed: another rank is gone ({detail}); "
            f"run the same command again to resume from the last checkpoint")
