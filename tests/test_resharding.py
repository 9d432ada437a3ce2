"""Resuming on another number of processes: DCP checkpoints (parallel=none, ddp, fsdp2) are resharded
by torch.distributed.checkpoint on load; ZeRO checkpoints go through DeepSpeed's universal
checkpoint conversion. Checked against the state the writer had and against the run that never stopped."""
import shutil
import types
import warnings

import pytest
import torch
from conftest import SGD, SMALL, run_pipeline, run_torchrun, updates_close, weights_close
from parallel_worker import CHUNK, SEED, problem
from resharding_worker import WRITTEN_STEPS, adamw, batch
from test_parallel import crash_after_step_3, torchrun_script

from pipeline.parallel import checkpoint, zero_universal
from pipeline.parallel.engine import Engine
from pipeline.errors import UserError
from pipeline.train.two_pass import one_pass_step

# On 2 processes; @frozen_ckpt: the first block frozen, activation checkpointing; @lora: peft's adapters,
# whose checkpoints leave the frozen base out (parallel_worker).
WRITERS = ("ddp", "fsdp2", "zero2", "zero3@frozen_ckpt", "zero2@lora", "zero3@lora")
ON_ONE = ("ddp:fsdp2", "fsdp2:none", "zero2:zero2", "zero3@frozen_ckpt:zero3", "zero2@lora:zero2",
          "zero3@lora:zero3")  # written:resumed
ON_FOUR = ("fsdp2:fsdp2", "fsdp2:ddp", "zero2:zero2", "zero3@frozen_ckpt:zero3")  # slow

# Float summation order differs with the number of processes; AdamW turns that noise into real
# steps where the true gradient is (nearly) zero. Losing the Adam moments moves weights by ~lr.
CONTINUED_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two steps on 2 processes under each backend, a checkpoint, the state then, and a third step."""
    out = tmp_path_factory.mktemp("resharding")
    torchrun_script(2, "tests/resharding_worker.py", str(out), "write", ",".join(WRITERS))
    return out


@pytest.fixture(scope="module")
def on_one(written):
    torchrun_script(1, "tests/resharding_worker.py", str(written), "resume", ",".join(ON_ONE))
    return written


def check_resumed(out, written: str, resumed: str) -> None:
    """The resumed engine holds exactly the writer's weights, Adam moments and per-group learning
    rates and weight decays; its next step matches the writer's next step, and not that of a
    restart that kept the weights but lost the optimizer state."""
    before = torch.load(out / written / "written.pt")
    loaded = torch.load(out / written / f"loaded-{resumed}.pt")
    assert loaded["groups"] == before["groups"]
    assert set(loaded["weights"]) == set(before["weights"]) and set(loaded["optim"]) == set(before["optim"])
    for name, tensor in before["weights"].items():
        assert torch.equal(loaded["weights"][name], tensor), name
    for name, moments in before["optim"].items():
        for key, tensor in moments.items():
            assert torch.equal(loaded["optim"][name][key], tensor), f"{name} {key}"
    assert before["optim"]["head.1.weight"]["exp_avg_sq"].abs().sum() > 0

    straight = torch.load(out / written / "straight.pt")
    continued = torch.load(out / written / f"continued-{resumed}.pt")
    assert largest_difference(continued, straight) < CONTINUED_TOLERANCE
    restarted = restarted_without_optimizer_state(written.partition("@")[2] or "plain", before["weights"])
    assert largest_difference(restarted, straight) > 10 * CONTINUED_TOLERANCE


def largest_difference(a: dict, b: dict) -> float:
    """Over all weights but the attention key bias: its true gradient is exactly zero (softmax ignores
    it), so its computed gradient is rounding noise, which AdamW turns into steps of up to the learning
    rate that differ between any two summation orders (1 process against 2 with the RS@k loss split
    across them: 5e-5 there, every other weight within 2e-7)."""
    return max((without_key_bias(k, a[k]) - without_key_bias(k, b[k])).abs().max().item() for k in b)


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not name.endswith("attn.qkv.bias"):
        return tensor
    query, _, value = tensor.chunk(3)
    return torch.cat([query, value])


def restarted_without_optimizer_state(variant: str, weights: dict) -> dict:
    """One process: the checkpoint's weights, a fresh AdamW at the same learning rate, the third step."""
    model, _, loss_fn = problem(variant)
    model.load_state_dict(weights)
    engine = Engine(model, *adamw(model), torch.device("cpu"))
    with warnings.catch_warnings():  # the scheduler advanced without optimizer steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(WRITTEN_STEPS):
            engine.scheduler.step()
    one_pass_step(engine, *batch(WRITTEN_STEPS), loss_fn, CHUNK, SEED, WRITTEN_STEPS)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pair", ON_ONE)
def test_two_process_checkpoint_resumes_on_one(on_one, pair):
    written, resumed = pair.split(":")
    check_resumed(on_one, written, f"{resumed}-1")


def test_zero_conversion_is_written_once_beside_the_checkpoint(on_one):
    step = on_one / "zero2" / f"step_{WRITTEN_STEPS}"
    assert (step / "universal" / "zero" / "zero" / "head.1.weight" / "exp_avg.pt").is_file()
    assert not (step / "universal.tmp").exists()
    before = (step / "universal" / "zero" / "zero" / "optimizer_state.pt").stat().st_mtime_ns
    assert zero_universal.convert(step, "zero") == step / "universal"  # reused, not converted again
    assert (step / "universal" / "zero" / "zero" / "optimizer_state.pt").stat().st_mtime_ns == before


def test_zero_checkpoint_that_cannot_be_converted(written, tmp_path):
    """A ZeRO checkpoint missing a rank's partition: one line, and no half-written conversion."""
    step = tmp_path / "step_2"
    shutil.copytree(written / "zero2" / "step_2", step, ignore=shutil.ignore_patterns("universal*"))
    next((step / "zero").glob("*rank_1*optim_states.pt")).unlink()
    with pytest.raises(UserError, match="could not convert .* resume with the number of processes that wrote it"):
        zero_universal.convert(step, "zero")
    assert not (step / "universal").exists() and not (step / "universal.tmp").exists()


def test_another_backend_family_is_refused(written):
    last = checkpoint.latest(written / "zero2")
    for parallel, fmt in (("zero3", "deepspeed"), ("fsdp2", "dcp")):
        engine = types.SimpleNamespace(checkpoint_format=fmt)
        with pytest.raises(UserError, match="written with parallel=zero2; resume with parallel=zero2"):
            checkpoint.load(last, engine, parallel=parallel)


def test_pipeline_one_process_checkpoint_resumes_on_two_under_fsdp2(sgd_run, tmp_path):
    """A run in one process (parallel=none); its step-3 checkpoint resumes under torchrun
    with 2 FSDP2 processes and ends where the one process ended."""
    shutil.copytree(sgd_run / "shards", tmp_path / "shards")
    shutil.copytree(sgd_run / "stages", tmp_path / "stages")
    shutil.copytree(sgd_run / "checkpoints", tmp_path / "checkpoints")
    crash_after_step_3(tmp_path)
    proc = run_torchrun(2, "stage=export", f"run_dir={tmp_path}", "parallel=fsdp2", *SMALL, *SGD)
    assert "resuming from" in proc.stderr and "step 6/6" in proc.stderr
    updates_close(tmp_path, sgd_run)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_four(written):
    torchrun_script(4, "tests/resharding_worker.py", str(written), "resume", ",".join(ON_FOUR))
    for pair in ON_FOUR:
        written_by, resumed = pair.split(":")
        check_resumed(written, written_by, f"{resumed}-4")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["zero1", "zero2", "zero3"])
def test_pipeline_zero_checkpoint_resumes_on_one_process(digits_run, tmp_path, parallel):
    """A 2-process ZeRO run's step-3 checkpoint, resumed by one process through the universal
    conversion, ends where one process on the whole run ends. AdamW, not SGD: DeepSpeed's universal
    conversion reads Adam's moments (tests/test_slurm.py says where), so the weights are compared within
    AdamW's float noise (the worker-level tests compare the whole state exactly)."""
    run_torchrun(2, "stage=finetune", f"run_dir={tmp_path}", f"parallel={parallel}", *SMALL)
    crash_after_step_3(tmp_path)
    proc = run_pipeline("stage=export", f"run_dir={tmp_path}", f"parallel={parallel}", *SMALL)
    assert "written by 2 processes, resuming on 1: converting it to a DeepSpeed universal checkpoint" in proc.stderr
    assert "step 6/6" in proc.stderr
    weights_close(tmp_path, digits_run)


@pytest.mark.slow
def test_pipeline_fsdp2_checkpoint_resumes_on_four_and_on_one(sgd_run, tmp_path):
    run_torchrun(2, "stage=finetune", f"run_dir={tmp_path}", "parallel=fsdp2", *SMALL, *SGD)
    crash_after_step_3(tmp_path)
    run_torchrun(4, "stage=export", f"run_dir={tmp_path}", "parallel=fsdp2", *SMALL, *SGD)
    updates_close(tmp_path, sgd_run)
    crash_after_step_3(tmp_path)
    run_pipeline("stage=export", f"run_dir={tmp_path}", "parallel=none", *SMALL, *SGD)
    updates_close(tmp_path, sgd_run)
