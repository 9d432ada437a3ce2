import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

# Two cores on CI: one thread per process keeps parallel subprocesses from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a CPU op into TORCH_EXTENSIONS_DIR: one per checkout, so that checkouts
# testing side by side do not rebuild it under each other.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))

# A digits run small enough for the tests: a few steps of a 2-block ViT.
SMALL = ["model.depth=2", "model.embed_dim=32", "train.global_batch=32", "train.chunk_size=8",
         "train.max_steps=6", "train.checkpoint_every=3", "train.warmup_steps=2", "eval.batch_size=128"]


# Several processes compared with one, at the stage level, train with SGD (momentum 0.9): AdamW's per-element
# normalisation hides a uniform error in the gradient's scale (a sum over ranks instead of their mean);
# SGD's update is proportional to the gradient, so such an error moves it by its whole size.
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.head_lr=0.05", "train.weight_decay=0"]


def run_pipeline(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python pipeline/run.py ...` as a user runs it, in a subprocess."""
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(nproc: int, *args: str, check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N pipeline/run.py ...` (a free port, gloo on the CPU), from `cwd`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(REPO / "pipeline" / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def sgd_run(tmp_path_factory) -> Path:
    """The one-process reference for the stage-level multi-process comparisons: SMALL + SGD, exported."""
    run_dir = tmp_path_factory.mktemp("sgd_run")
    run_pipeline("stage=export", f"run_dir={run_dir}", *SMALL, *SGD)
    return run_dir


def updates_close(run: Path, reference: Path) -> None:
    """The update of `run` (its exported weights minus the initial ones) equals `reference`'s within 1e-3
    of the largest update: rounding differs between process counts, a wrong gradient scale or batch share
    moves the update by its own size."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.models.encoders import build_encoder

    cfg = load_config(SMALL)
    start = build_encoder(cfg.model, cfg.seed).state_dict()
    got, ref = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    largest = max((ref[k] - start[k]).abs().max().item() for k in ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-3 * largest, f"update differs from one process's by {worst:.2e} (largest update {largest:.2e})"


def weights_close(run: Path, reference: Path, tolerance: float = 5e-5) -> None:
    """The exported weights of an AdamW `run` equal `reference`'s (AdamW on one process) within `tolerance`:
    AdamW turns the rounding that differs between process counts into steps (hence not updates_close),
    while a lost optimizer state or a wrong batch share moves weights by about lr (1e-4) a step."""
    from safetensors.torch import load_file

    got, ref = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < tolerance, f"weights differ from one process's by {worst:.2e}"


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> tuple[int, str, Path]:
    """The README's first command as a user runs it (its threads, not the suite's one), its output in a
    file as `> log 2>&1` or a Slurm .out file writes it: (exit status, the output, the run directory).
    The Quick start test reads its table, tests/test_logs.py its lines."""
    folder = tmp_path_factory.mktemp("quickstart")
    out, run_dir = folder / "demo.out", folder / "demo"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), "stage=all", f"run_dir={run_dir}"],
                              cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=1200, env=env)
    return proc.returncode, out.read_bytes().decode(), run_dir  # bytes: read_text would turn \r into \n


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """One complete `stage=all` run on digits, shared by the tests that only read its artifacts."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    run_pipeline("stage=all", f"run_dir={run_dir}", *SMALL)
    return run_dir


def training_processes(run_dir: Path) -> list[psutil.Process]:
    """The pipeline/run.py processes writing run_dir: the ranks, not their launcher (torchrun, srun, bash)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (len(cmd) > 2 and "python" in Path(cmd[0]).name and cmd[1] != "-m" and f"run_dir={run_dir}" in cmd
                and any(c.endswith("pipeline/run.py") for c in cmd)):
            found.append(proc)
    return found
