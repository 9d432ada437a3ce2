"""The two-pass step across 2 gloo processes under each backend equals one process's one-pass step on
the whole batch; checkpoints, launchers and the srun environment."""
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache

import pytest
import torch
from conftest import REPO, SGD, SMALL, run_torchrun, updates_close
from parallel_worker import (CHUNK, CLIP, COMPILE_VARIANTS, LOSS_VARIANTS, SEED, TOWER_VARIANTS, VARIANTS,
                             optimizer_for, problem, sgd)
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from pipeline.parallel.distributed import expand_nodelist, slurm_rendezvous, world_from_env
from pipeline.parallel.engine import Engine, check_launcher, transformer_blocks
from pipeline.parallel.shares import check_shares
from pipeline.errors import UserError
from pipeline.losses import set_step
from pipeline.train.two_pass import one_pass_step

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
# The loss variants (SiMix split across ranks; RS@k computed whole on every rank) run on DDP by default;
# the loss path does not depend on the backend, the other backends run them in the slow set.
DEFAULT_LOSS_COMBOS = tuple(f"ddp:{v}" for v in LOSS_VARIANTS)
# What trains (issue 39): parameter groups per layer under a partitioning backend and a sharding one;
# LoRA (peft's adapters with dropout, the base frozen) under each kind of backend.
OPTION_COMBOS = ("zero2:layer_decay", "fsdp2:layer_decay", "ddp:lora", "zero3:lora", "fsdp2:lora")
TOWER_COMBOS = tuple(f"{b}:{v}" for b in ("fsdp2", "zero3") for v in TOWER_VARIANTS)
# ZeRO-3 with the optimizer state offloaded to the CPU: one variant, in the same launch (its own cost a
# few seconds; the launch's start-up is shared).
OFFLOAD_COMBOS = ("zero3_offload:plain",)


def torchrun_script(nproc: int, script: str, *args: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    """One torchrun launch runs every backend and variant (the start-up is most of the cost)."""
    out = tmp_path_factory.mktemp("parallel")
    torchrun_script(2, "tests/parallel_worker.py", str(out), ",".join(BACKENDS), ",".join(VARIANTS + ("clip",)),
                    ",".join(DEFAULT_LOSS_COMBOS + OPTION_COMBOS + TOWER_COMBOS + OFFLOAD_COMBOS))
    return out


@lru_cache
def one_process(variant: str) -> tuple[dict, dict, list[float]]:
    """Independent reference: one process, the naive one-pass step on the whole global batch (the
    whole loss: no split). Weights before, after, and the loss of each step."""
    model, batches, loss_fn = problem(variant)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, *optimizer_for(variant)(model), torch.device("cpu"))
    losses = []
    for step, (images, labels) in enumerate(batches):
        set_step(loss_fn, step)
        losses.append(one_pass_step(engine, images, labels, loss_fn, CHUNK, SEED, step).item())
    return start, model.state_dict(), losses


class ClippedByHand(Engine):
    """One process whose step clips by hand: the 2-norm of all gradients in float64, then every
    gradient times min(1, CLIP / (norm + 1e-6))."""

    def step(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        self.norms.append(norm)
        for g in grads:
            g.mul_(min(1.0, CLIP / (norm + 1e-6)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@lru_cache
def one_process_clipped() -> tuple[dict, list[float]]:
    model, batches, loss_fn = problem("plain")
    engine = ClippedByHand(model, *sgd(model), torch.device("cpu"))
    engine.norms = []
    for step, (images, labels) in enumerate(batches):
        one_pass_step(engine, images, labels, loss_fn, CHUNK, SEED, step)
    return model.state_dict(), engine.norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_updates_equal_one_process(worker_out, backend):
    """train.grad_clip under each backend on 2 processes: the global norm before clipping, and the
    clipped update, are those of one process clipping the whole batch's gradient by hand."""
    ref, ref_norms = one_process_clipped()
    start, unclipped, _ = one_process("plain")
    assert all(n > CLIP for n in ref_norms)  # both steps were clipped: the comparison is about clipping
    got = torch.load(worker_out / f"{backend}-clip.pt")
    norms = json.loads((worker_out / f"{backend}-clip-norms.json").read_text())
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    update = torch.cat([(ref[n] - start[n]).flatten() for n in ref])
    error = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
    assert error.norm() <= 1e-5 * update.norm()
    off = torch.cat([(unclipped[n] - ref[n]).flatten() for n in ref])
    assert off.norm() > 0.1 * update.norm()  # unclipped steps end elsewhere


def assert_equals_one_process(out, backend, variant):
    """Weights within 1e-5 relative per tensor and 1e-5 of the update; the loss of every step within
    1e-5 relative (the global loss, which a split sums from the ranks' parts)."""
    start, ref, ref_losses = one_process(variant)
    got = torch.load(out / f"{backend}-{variant}.pt")
    losses = json.loads((out / f"{backend}-{variant}.losses.json").read_text())
    assert losses == pytest.approx(ref_losses, rel=1e-5), (losses, ref_losses)
    assert set(got) == set(ref)
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative difference {err:.2e}"
    # The steps moved the weights far more than the tolerance, so a wrong gradient (half of it, one
    # rank's rows only, another drop-path mask) would fail; frozen weights did not move at all.
    update = torch.cat([(ref[n] - start[n]).flatten() for n in ref])
    error = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
    assert error.norm() <= 1e-5 * update.norm()
    return start, got


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_equal_one_process(worker_out, backend, variant):
    start, got = assert_equals_one_process(worker_out, backend, variant)
    if variant == "frozen_ckpt":
        for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.pos_embed"):
            assert torch.equal(got[name], start[name]), name
        assert not torch.equal(got["backbone.blocks.1.attn.qkv.weight"], start["backbone.blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("combo", DEFAULT_LOSS_COMBOS)
def test_loss_split_or_whole_equals_one_process(worker_out, combo):
    """SiMix split across the 2 ranks (originals and virtual queries shared out) and RS@k computed whole
    on every rank (split_across_ranks=False, the path of the losses that do not split)."""
    assert_equals_one_process(worker_out, *combo.split(":"))


@pytest.mark.parametrize("combo", OPTION_COMBOS)
def test_what_trains_equals_one_process(worker_out, combo):
    """train.layer_decay's parameter groups (one lr per layer) and model.lora's adapters on 2 processes."""
    assert_equals_one_process(worker_out, *combo.split(":"))


@pytest.mark.parametrize("backend", [c.split(":")[0] for c in OPTION_COMBOS if c.endswith(":lora")])
def test_lora_checkpoint_exports_and_reloads(worker_out, backend):
    """A LoRA run's checkpoint: one process consolidates it (ZeRO: zero_to_fp32) into the trained
    weights, frozen base included, and a fresh engine resumes it; it holds only what trains (DCP's
    files, DeepSpeed's with exclude_frozen_parameters), far less than the model."""
    trained = torch.load(worker_out / f"{backend}-lora.pt")
    for copy in ("exported", "reloaded"):
        got = torch.load(worker_out / f"{backend}-lora-{copy}.pt")
        assert set(got) == set(trained) and all(torch.equal(got[n], t) for n, t in trained.items()), copy
    files = (worker_out / f"checkpoint-{backend}-lora").rglob("*.distcp" if backend in ("ddp", "fsdp2") else "*.pt")
    assert sum(f.stat().st_size for f in files) < sum(4 * t.numel() for t in trained.values()) / 2


@pytest.mark.parametrize("combo", TOWER_COMBOS)
def test_new_tower_under_sharding_equals_one_process(worker_out, combo):
    """DINOv3 (timm: RoPE, registers) with activation checkpointing and model.trainable_blocks=1, its
    blocks sharded by FSDP2 or ZeRO-3 over 2 processes: the one-process one-pass step."""
    start, got = assert_equals_one_process(worker_out, *combo.split(":"))
    frozen = [n for n in start if n.startswith("backbone.blocks.0.") or n.startswith("backbone.patch_embed.")]
    assert frozen and all(torch.equal(got[n], start[n]) for n in frozen)
    assert not torch.equal(got["backbone.blocks.1.attn.qkv.weight"], start["backbone.blocks.1.attn.qkv.weight"])


COMPILE_BACKENDS = ("ddp", "zero1", "zero2")  # the backends of several processes that leave each block's forward alone


@pytest.mark.slow  # inductor compiles the blocks in each process: too slow for the default launch
def test_compiled_blocks_equal_one_eager_process(tmp_path):
    """train.compile under ddp, ZeRO-1 and ZeRO-2 (ZeRO-3 and FSDP2 gather each block's weights in hooks
    around its forward and are refused), with LoRA dropout, drop-path and activation checkpointing:
    2 processes equal one eager process."""
    torchrun_script(2, "tests/parallel_worker.py", str(tmp_path), ",".join(COMPILE_BACKENDS), ",".join(COMPILE_VARIANTS))
    for backend in COMPILE_BACKENDS:
        for variant in COMPILE_VARIANTS:
            assert_equals_one_process(tmp_path, backend, variant)


@pytest.mark.slow
def test_loss_variants_on_every_backend(tmp_path):
    others = [b for b in BACKENDS if b != "ddp"]
    torchrun_script(2, "tests/parallel_worker.py", str(tmp_path), ",".join(others), ",".join(LOSS_VARIANTS))
    for backend in others:
        for variant in LOSS_VARIANTS:
            assert_equals_one_process(tmp_path, backend, variant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_sharded_under_zero3_and_fsdp2(worker_out, backend):
    local, full = map(int, (worker_out / f"{backend}-plain.numel").read_text().split())
    if backend in ("zero3", "fsdp2"):
        # Half, give or take tensors whose first dimension does not split evenly (the class token).
        assert local <= 0.51 * full, f"rank 0 holds {local} of {full} weights"
    else:
        assert local == full


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_consolidates_the_checkpoint(worker_out, backend, variant):
    """One process rebuilds the whole model from the ranks' checkpoint (ZeRO: zero_to_fp32), frozen
    weights included."""
    trained = torch.load(worker_out / f"{backend}-{variant}.pt")
    exported = torch.load(worker_out / f"{backend}-{variant}-exported.pt")
    assert set(exported) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_gradients_are_synchronised_once_per_step(worker_out, backend):
    """Each rank embeds 2 chunks per step; the step synchronises as often as ONE plain backward does
    (DDP: once per bucket; FSDP2: once per sharded unit), not once per chunk. DDP rebuilds its
    buckets after the first step, so the first step may use fewer; the last one is compared."""
    syncs = json.loads((worker_out / f"{backend}-syncs.json").read_text())
    assert syncs["units"] >= 1 and syncs["per_step"][-1] == syncs["units"], syncs
    assert all(1 <= n <= syncs["units"] for n in syncs["per_step"]), syncs


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_checkpoint_reloads_the_weights(worker_out, backend):
    saved = torch.load(worker_out / f"{backend}-{VARIANTS[0]}.pt")
    reloaded = torch.load(worker_out / f"{backend}-reloaded.pt")
    start, _, _ = one_process(VARIANTS[0])
    for name, tensor in saved.items():
        assert torch.equal(reloaded[name], tensor), name
    assert not torch.equal(saved["head.1.weight"], start["head.1.weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_loads_the_weights_alone(worker_out, backend):
    """What ReloadBest does, under every backend: the weights of the checkpoint, and a next step from them."""
    saved = torch.load(worker_out / f"{backend}-{VARIANTS[0]}.pt")
    found = torch.load(worker_out / f"{backend}-weights-only.pt")
    for name, tensor in saved.items():
        assert torch.equal(found["loaded"][name], tensor), name
        assert torch.allclose(found["stepped"][name], found["reference"][name], rtol=0, atol=1e-6), name
    assert not torch.equal(found["stepped"]["head.1.weight"], saved["head.1.weight"])


def test_transformer_blocks_found():
    model, _, _ = problem("plain")
    assert transformer_blocks(model) == list(model.backbone.blocks)


def test_shares_must_be_whole_chunks():
    check_shares(TrainConfig(global_batch=32, chunk_size=8), 2)
    check_shares(TrainConfig(global_batch=36, chunk_size=8), 1)  # one process: a short last chunk is fine
    with pytest.raises(UserError, match="pick a global batch divisible by 16"):
        check_shares(TrainConfig(global_batch=24, chunk_size=8), 2)


def test_accelerate_config_must_match_parallel():
    check_launcher("zero2", {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(UserError, match="add parallel=fsdp2"):
        check_launcher("ddp", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(UserError, match="add parallel=zero1"):
        check_launcher("fsdp2", {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_srun_environment(monkeypatch):
    assert expand_nodelist("gpu[01-03,10],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu10", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is parsed here
    env = {"SLURM_JOB_NODELIST": "a[100-101]", "SLURM_JOB_ID": "123456", "SLURM_PROCID": "3", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1"}
    assert slurm_rendezvous(env) == ("a100", str(20000 + 123456 % 20000))
    assert world_from_env(env).rank == 3 and world_from_env(env).size == 8 and world_from_env(env).local_rank == 1


def test_stage_all_zero3_under_torchrun(sgd_run, tmp_path):
    """Started from outside the repository: the default ds_configs/zero3.json is found all the same. Rank 0
    runs the single-process stages (shard, embed) while the other waits; each stage's marker once."""
    run_torchrun(2, "stage=all", f"run_dir={tmp_path}", "parallel=zero3", *SMALL, *SGD, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        f"{s}.json" for s in ("embed", "eval", "export", "finetune", "shard")]
    assert (tmp_path / "embeddings" / "frozen" / "test.npz").is_file()
    meta = json.loads((tmp_path / "checkpoints" / "step_6" / "meta.json").read_text())
    assert meta["format"] == "deepspeed" and meta["parallel"] == "zero3"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "latest", "step_3", "step_6"]
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == {"frozen", "finetuned"}
    updates_close(tmp_path, sgd_run)


def crash_after_step_3(run) -> None:
    """As if the run had died after its step-3 checkpoint."""
    shutil.rmtree(run / "checkpoints" / "step_6")
    (run / "checkpoints" / "latest").write_text("step_3")
    for stage in ("finetune", "export", "eval"):
        (run / "stages" / f"{stage}.json").unlink(missing_ok=True)


@pytest.mark.slow
def test_stage_all_fsdp2_under_torchrun_and_resume(sgd_run, tmp_path):
    run_torchrun(2, "stage=all", f"run_dir={tmp_path}", "parallel=fsdp2", *SMALL, *SGD)
    assert json.loads((tmp_path / "checkpoints" / "step_6" / "meta.json").read_text())["format"] == "dcp"
    updates_close(tmp_path, sgd_run)
    straight = load_file(tmp_path / "export" / "model.safetensors")
    crash_after_step_3(tmp_path)
    proc = run_torchrun(2, "stage=export", f"run_dir={tmp_path}", "parallel=fsdp2", *SMALL, *SGD)
    assert "resuming from" in proc.stderr and "step 6/6" in proc.stderr
    resumed = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.slow
def test_resume_under_accelerate_launch(tmp_path):
    """`accelerate launch` with the repository's DeepSpeed YAML (it starts the processes; the pipeline
    reads RANK / WORLD_SIZE) resumes a torchrun run's ZeRO-2 checkpoint to the same weights."""
    run_torchrun(2, "stage=export", f"run_dir={tmp_path}", "parallel=zero2", *SMALL)
    straight = load_file(tmp_path / "export" / "model.safetensors")
    crash_after_step_3(tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "ds_configs" / "accelerate_deepspeed.yaml"), str(REPO / "pipeline" / "run.py")]
    proc = subprocess.run([*launch, "stage=export", f"run_dir={tmp_path}", "parallel=zero2", *SMALL], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "step 6/6" in proc.stderr
    resumed = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.parametrize("combo", OFFLOAD_COMBOS)
def test_offloaded_optimizer_equals_one_process(worker_out, combo):
    """parallel=zero3_offload: the ZeRO-3 step with the optimizer's state and step on the CPU side."""
    assert_equals_one_process(worker_out, *combo.split(":"))


@pytest.mark.slow
def test_launch_from_srun_variables(sgd_run, tmp_path):
    """Two processes started as srun starts them: only SLURM_* variables, no RANK or MASTER_ADDR; the
    rendezvous comes from the node list and the job id. (A real Slurm cluster is not started here.)"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    job = str(os.getpid() % 20000 + 1)
    procs = [subprocess.Popen([sys.executable, str(REPO / "pipeline" / "run.py"), "stage=export", f"run_dir={tmp_path}",
                               "parallel=ddp", *SMALL, *SGD], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job})
             for rank in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "step 6/6" in outputs[0][1]
    updates_close(tmp_path, sgd_run)
