"""The soak test: a finetune killed 10 times at random moments (SIGKILL, SIGTERM, SIGUSR1; some right
as a checkpoint is written, some during validation), each time restarted with the same command,
ends with weights bit-identical to an uninterrupted run's, no .tmp left, and checkpoints/latest
naming an intact checkpoint after every kill. Seeded and bounded; slow (minutes).

    PYTHONPATH=$PWD python -m pytest -m slow -s tests/test_soak.py -k "1-none"

prints the figures BENCHMARKS.md records (kills survived, checkpoints lost, steps recomputed).
Signals go to the ranks themselves (tests/conftest.py training_processes), as Slurm's do: under
torchrun SIGKILL kills every rank (a node lost), SIGTERM and SIGUSR1 one rank (the others stop at the
same step). Not run here: the same kills through the local Slurm cluster (scancel --signal)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, run_pipeline, training_processes
from test_resume import same_weights

from pipeline.parallel import checkpoint

pytestmark = pytest.mark.slow
KILLS, STEPS, EVERY, VALIDATE = 10, 60, 4, 10
MIN_KILLS = 8  # signals that must stop a run (one that lands as the run ends stops nothing)
TRAIN = [*SMALL, f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", f"train.val_every={VALIDATE}",
         "train.keep_checkpoints=2", "train.log_every=1", "track=none", "stage=finetune"]
MOMENTS = ("random", "checkpoint", "validation")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)


def command(processes: int, parallel: str, run: Path) -> list[str]:
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, str(REPO / "pipeline" / "run.py"), f"run_dir={run}", f"parallel={parallel}", *TRAIN]


def last_step(log: Path) -> int:
    """The last step the run's log says it finished (0 if none)."""
    text = log.read_text() if log.is_file() else ""
    steps = [int(line.split("step ")[1].split("/")[0]) for line in text.splitlines() if f"/{STEPS}  loss" in line]
    return steps[-1] if steps else 0


def resumed_step(log: Path, since: int) -> int | None:
    """The step the run started at, from its log lines (after character `since`); None if it was
    killed before it got that far."""
    text = log.read_text()[since:] if log.is_file() else ""
    marker = "resuming from "
    if marker in text:
        return int(text.split(marker)[1].split("step_")[1].split()[0])
    return 0 if f"/{STEPS}  loss" in text else None


def wait_for(moment: str, rng: random.Random, proc: subprocess.Popen, log: Path, since: int) -> None:
    """Until the moment to kill: during start-up (or the resume), a random few steps past where the last
    kill struck, just after a checkpointed step's line (the checkpoint is being written), or just after
    a validated step's line (validation is running). Counted in steps, not seconds, so that a fast
    machine does not finish the run before the ten kills."""
    start = last_step(log)
    if moment == "random":
        ahead = rng.randrange(-1, 4)
        if ahead < 0:  # start-up: importing, building, loading the checkpoint
            time.sleep(rng.uniform(0.5, 3.0))
            return
        target, pause = start + ahead, 1.0
    else:
        period = EVERY if moment == "checkpoint" else VALIDATE
        target, pause = (start // period + 1) * period, 0.3 if moment == "checkpoint" else 1.0
        if target >= STEPS:
            target = max(period, start // period * period)  # not reachable again: any moment after start
    deadline = time.monotonic() + 300
    while last_step(log) < min(target, STEPS - 1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, pause))


def send(sig: signal.Signals, run: Path, proc: subprocess.Popen, rng: random.Random) -> bool:
    """`sig` to the ranks (all of them for SIGKILL, one for the others), once they exist; False if the
    run ended first (nothing was signalled)."""
    ranks = training_processes(run)
    while not ranks and proc.poll() is None:  # under torchrun the ranks start a few seconds after it
        time.sleep(0.05)
        ranks = training_processes(run)
    if not ranks:
        return False
    for rank in ranks if sig == signal.SIGKILL else [rng.choice(ranks)]:
        rank.send_signal(sig)
    return True


@pytest.mark.parametrize("processes,parallel", [(1, "none"), (2, "ddp"), (2, "fsdp2")],
                         ids=["1-none", "2-ddp", "2-fsdp2"])
def test_killed_ten_times_loses_nothing(processes, parallel, tmp_path):
    rng = random.Random(25)
    base, soak, alone = tmp_path / "base", tmp_path / "soak", tmp_path / "alone"
    run_pipeline(f"run_dir={base}", *SMALL, "stage=shard")
    for run in (soak, alone):
        shutil.copytree(base, run, ignore=shutil.ignore_patterns(".lock", "logs"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    subprocess.run(command(processes, parallel, alone), cwd=REPO, env=env, check=True, capture_output=True)
    uninterrupted = time.monotonic() - began

    log = soak / "logs" / "rank0.log"
    kills, recomputed, lost, pending, delivered = [], 0, 0, None, False
    began = time.monotonic()
    for k in range(KILLS + 1):
        since = len(log.read_text()) if log.is_file() else 0
        proc = subprocess.Popen(command(processes, parallel, soak), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if k < KILLS:
            moment, sig = MOMENTS[k % 3], SIGNALS[rng.randrange(3)] if k >= 3 else SIGNALS[k]
            wait_for(moment, rng, proc, log, since)
            reached = last_step(log)
            delivered = send(sig, soak, proc, rng)
        _, stderr = proc.communicate(timeout=900)
        start = resumed_step(log, since)
        if pending is not None and start is not None:  # what the last kill cost: steps done again, a checkpoint not resumed
            recomputed += max(0, pending["reached"] - start)
            lost += pending["latest"] is not None and start < pending["latest"]
            pending = None
        latest = soak / "checkpoints" / "latest"
        named = latest.read_text() if latest.is_file() else None
        if named is not None:
            assert checkpoint.damage(soak / "checkpoints" / named) is None, f"latest names a damaged {named}"
        if k == KILLS or proc.returncode == 0:  # the last run, or one that finished before the signal landed
            break
        assert delivered, f"run {k + 1} failed before it was signalled ({proc.returncode}):\n{stderr[-3000:]}"
        kills.append({"signal": sig.name, "moment": moment, "reached": reached, "exit": proc.returncode,
                      "latest": int(named[5:]) if named else None})
        pending = kills[-1]  # the next run that gets as far as resuming says what this kill cost
    soaked = time.monotonic() - began
    which = ", ".join(f"{k['signal']}@{k['moment']}:step {k['reached']}" for k in kills)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(kills) >= MIN_KILLS, f"only {len(kills)} of {KILLS} signals stopped the run ({which})"
    assert {k["signal"] for k in kills} == {s.name for s in SIGNALS}
    assert start, "the run that finished started over instead of resuming from a checkpoint"
    assert not list(soak.rglob("*.tmp")), list(soak.rglob("*.tmp"))
    same_weights(soak / "checkpoints" / f"step_{STEPS}", alone / "checkpoints" / f"step_{STEPS}", tmp_path)
    print(f"\nsoak {processes}x{parallel}: {len(kills)} kills survived ({which}); checkpoints lost {lost}; "
          f"steps recomputed {recomputed} of {STEPS}; {soaked:.0f} s soaked vs {uninterrupted:.0f} s uninterrupted")
    assert lost == 0
