"""stage=plan: the fake step's memory and FLOPs equal the real step's, model states equal their closed
form at any world size, the largest chunk is the largest that fits, and a plan that cannot fit says so."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import REPO, run_pipeline

from pipeline.config import load_config
from pipeline.plan import depth, estimate
from pipeline.plan.simulate import Measurement, fake_group, simulate

TINY = ["model.depth=2", "model.embed_dim=32", "train.global_batch=32", "train.chunk_size=8"]
# A small open_clip ViT (the ViT-L/14 and ViT-g/14 presets' code, activation checkpointing on), in bf16
# autocast as a GPU run of train.precision=auto does.
SMALL_CLIP = ["model=vitl14_clip", "model.depth=4", "model.width=64", "model.heads=2", "model.image_size=56",
              "model.embed_dim=32", "train.precision=bf16", "train.global_batch=32", "train.chunk_size=8"]


def fake(cfg, world: int, chunk: int, **kw) -> Measurement:
    with fake_group(world):
        return simulate(cfg, chunk, loss_rows=0, **kw)


def real_one_process(cfg, chunk: int) -> Measurement:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return simulate(cfg, chunk, fake=False)
    finally:
        dist.destroy_process_group()


def real_two_processes(tmp_path, overrides: list[str]) -> dict:
    out = tmp_path / "real.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launcher, str(REPO / "tests" / "plan_worker.py"), str(out), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same_step(fake_m: Measurement, real: dict) -> None:
    """Tracked peak and FLOPs within 5 %."""
    assert fake_m.peak == pytest.approx(real["peak"], rel=0.05), (fake_m.phase_peak, real["phase_peak"])
    fake_flops, real_flops = sum(fake_m.phase_flops.values()), sum(real["phase_flops"].values())
    assert fake_flops == pytest.approx(real_flops, rel=0.05)


@pytest.mark.parametrize("parallel", ["fsdp2", "none"])
def test_fake_step_equals_real_step_one_process(parallel):
    cfg = load_config([f"parallel={parallel}", *TINY])
    assert_same_step(fake(cfg, 1, 8), dataclasses.asdict(real_one_process(cfg, 8)))


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
@pytest.mark.parametrize("parallel", ["fsdp2", "none"])
def test_fake_step_equals_real_step_small_clip_bf16(parallel, checkpointing):
    cfg = load_config([f"parallel={parallel}", *SMALL_CLIP, f"model.grad_checkpointing={checkpointing}"])
    assert_same_step(fake(cfg, 1, 8), dataclasses.asdict(real_one_process(cfg, 8)))


def test_checkpointing_keeps_fewer_activations_and_frees_them():
    """Pass 2's activations grow with the chunk, are fewer with checkpointing, and none are left when the
    optimizer runs (FlopCounterMode's own module tracker kept the recomputed ones alive: simulate._WholeStep)."""
    def activations(checkpointing: bool, chunk: int, phase: str = "pass2") -> int:
        cfg = load_config(["parallel=none", *SMALL_CLIP, f"model.grad_checkpointing={checkpointing}"])
        return fake(cfg, 1, chunk, steps=1).phase_at_peak[phase].get("Activation", 0)

    with_ac = {chunk: activations(True, chunk) for chunk in (4, 8)}
    without = {chunk: activations(False, chunk) for chunk in (4, 8)}
    assert with_ac[4] < with_ac[8] and without[4] < without[8]
    assert with_ac[8] < 0.6 * without[8]
    assert activations(True, 8, "optimizer") < 0.01 * with_ac[8]  # a few scalars (the gradient norm)


@pytest.mark.parametrize("parallel,world", [("fsdp2", 8), pytest.param("zero3", 1, marks=pytest.mark.slow)])  # zero3: 33 s
def test_two_small_depths_extrapolate_exactly_to_the_full_depth(parallel, world):
    """Every figure of the step at 8 blocks, from 3 and 5 blocks (depth.py), equals the simulation of all
    8, to the byte and FLOP (zero3 simulates the single-device engine)."""
    cfg = load_config([f"parallel={parallel}", *SMALL_CLIP, "model.depth=8", f"train.global_batch={8 * world}",
                       "plan.nodes=1", f"plan.gpus_per_node={world}"])
    assert depth.full_depth(cfg) == 8 and depth.simulated_depths(cfg, 8) == (3, 5)
    whole, scaled = (flat(dataclasses.asdict(estimate.measure(cfg, 4, d))) for d in (None, 8))
    whole.pop("seconds"), scaled.pop("seconds")
    assert scaled == pytest.approx(whole, rel=1e-12)


def flat(figures: dict, prefix: str = "") -> dict[str, float]:
    """Nested dicts of figures as {"a.b": value}, the zeros left out."""
    out = {}
    for k, v in figures.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v} if v else {})
    return out


def test_zero_memory_is_the_peak_without_model_states_plus_deepspeeds():
    """The single-device engine's peak of all but the model states: where those do not change (pass 1)
    it is the peak less them; in pass 2 of one chunk the whole gradients peak at the end of the backward,
    later than the activations, so it is above the peak less the states at the peak; estimate.fit_of
    adds DeepSpeed's sharded states to it."""
    cfg = load_config(["parallel=zero3", *SMALL_CLIP, "train.global_batch=8", "plan.nodes=1", "plan.gpus_per_node=1"])
    m = fake(cfg, 1, 8, backend="none")  # as estimate.measure runs zero*

    def without_states(phase: str) -> int:
        return m.phase_peak[phase] - sum(m.phase_at_peak[phase].get(k, 0) for k in ("Parameter", "Gradient", "Optstate"))

    assert m.phase_rest["pass1"] == without_states("pass1")
    assert m.phase_rest["pass2"] > without_states("pass2")
    fit = estimate.fit_of(cfg, m)
    assert fit.phases["pass2"] == m.phase_rest["pass2"] + estimate.zero_states(cfg, m)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
@pytest.mark.parametrize("model", [[], ["model.depth=4", "model.image_size=64", "model.patch_size=16"]],
                         ids=["tiny", "small_vit"])
def test_fake_step_equals_real_step_two_processes(tmp_path, parallel, model):
    """DDP: the fake run is the single-device engine (DDP's reducer cannot run on fake tensors); the real
    run's tracker sees DDP's gradient buckets (a fp32 copy of the gradients, allocated by the reducer in
    the first backward, inside the tracker), which the plan adds in closed form (estimate.fit_of)."""
    overrides = [f"parallel={parallel}", *TINY, *model]
    cfg = load_config(overrides)
    m = fake(cfg, 2, 8)
    if parallel == "ddp":
        m = dataclasses.replace(m, peak=m.peak + 4 * m.trainable)  # the buckets, as estimate.fit_of adds them
    assert_same_step(m, real_two_processes(tmp_path, overrides))


def closed_form(model_cfg, world: int) -> tuple[int, int, int]:
    """(parameters, parameter tensors, fp32 bytes of rank 0's shards): FSDP2's rank 0 holds
    ceil(dim0 / world) rows of each parameter (dim 0 padded to a multiple of the world size)."""
    import torch

    from pipeline.models.encoders import build_encoder

    with torch.device("meta"):
        params = list(build_encoder(model_cfg, 0).parameters())
    shard = sum(4 * math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) for p in params)
    return sum(p.numel() for p in params), len(params), shard


@pytest.mark.parametrize("world", [1, 8, pytest.param(64, marks=pytest.mark.slow)])
def test_model_states_per_rank_equal_the_closed_form(world):
    """FSDP2: fp32 sharded parameters, fp32 sharded gradients (reduce_dtype) and AdamW's two moments
    per rank, plus its 4-byte step count per parameter tensor; the single-device engine (what DDP's
    fake run is): whole ones."""
    small = ["model.depth=2", "model.embed_dim=32", f"train.global_batch={4 * world}", "train.chunk_size=2"]
    cfg = load_config(["parallel=fsdp2", *small])
    n, tensors, shard = closed_form(cfg.model, world)
    assert shard == pytest.approx(4 * n / world, rel=0.05 if world < 64 else 0.5)  # the padding: 3 % at 8, more at 64
    m = fake(cfg, world, 2, steps=1)
    assert m.phase_at_peak["optimizer"]["Sharded Grad"] == shard  # freed after the step (zero_grad)
    assert m.at_end["Sharded Param"] == shard and m.at_end["OptState"] == 2 * shard + 4 * tensors
    if world == 8:
        whole = fake(load_config(["parallel=ddp", *small]), world, 2, steps=1)
        assert whole.phase_at_peak["optimizer"]["Gradient"] == 4 * n
        assert whole.at_end["Parameter"] == 4 * n and whole.at_end["Optstate"] == 8 * n + 4 * tensors


@pytest.mark.slow
def test_largest_chunk_fits_for_real_and_one_more_does_not():
    """One process, so that every chunk is valid: the budget sits between the totals at chunks 8 and 16."""
    cfg = load_config(["parallel=fsdp2", *TINY, "plan.nodes=1", "plan.gpus_per_node=1"])

    def measure_fit(chunk):
        return estimate.fit_of(cfg, fake(cfg, 1, chunk))

    first, top = measure_fit(8), measure_fit(16)
    budget = (first.total + top.total) / 2
    best, _ = estimate.largest_chunk(cfg, first, measure_fit, budget)
    assert 8 <= best.chunk < 16
    real = [estimate.fit_of(cfg, real_one_process(cfg, c)) for c in (best.chunk, best.chunk + 1)]
    assert real[0].total <= budget < real[1].total


def test_unfittable_plan_says_so_in_one_line_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_pipeline("stage=plan", f"run_dir={run_dir}", "parallel=fsdp2", *TINY, "plan.gpu_memory_gb=0.5",
                        "plan.gpu=H100-80GB", "plan.gpus_per_node=2", "plan.search=false", "plan.train_images=1000",
                        check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "does NOT fit" in last and "GiB per GPU needed, 0.5 GiB there" in last
    assert sorted(p.name for p in run_dir.iterdir()) == ["plan"]  # no config.yaml, shards or checkpoints
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    assert plan["fits"] is False and plan["world_size"] == 2 and plan["peak_gb_per_gpu"] > 0.5


def test_step_time_uses_the_peak_of_the_precision_that_runs():
    """One simulation shared by three plans (FLOPs do not depend on the precision): their compute times are
    in the ratio of the H100's data-sheet peaks, 989 bf16, 494.5 TF32 and 67 fp32 TFLOP/s (dense)."""
    measured = {}
    common = ["parallel=ddp", *TINY, "plan.nodes=1", "plan.gpus_per_node=2", "plan.gpu=H100-80GB",
              "plan.search=false", "plan.train_images=1000", "plan.all_blocks=true"]
    plans = {name: estimate.plan(load_config([*common, *keys]), log=lambda *a: None, measured=measured)
             for name, keys in {"bf16": ["train.precision=bf16"], "tf32": ["train.precision=fp32"],
                                "fp32": ["train.precision=fp32", "train.tf32=false"]}.items()}
    assert {name: p["precision"]["matmul"] for name, p in plans.items()} == {n: n for n in plans}
    assert {name: p["peak_tflops"] for name, p in plans.items()} == {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}
    bf16 = plans["bf16"]["compute_s"]
    assert plans["tf32"]["compute_s"] == pytest.approx(bf16 * 989 / 494.5)
    assert plans["fp32"]["compute_s"] == pytest.approx(bf16 * 989 / 67)


def test_plan_on_the_default_digits_with_a_plain_gpu_name(capsys):
    """The digits' size is known (it used to fail after the simulation), plan.gpu=h100 is H100-80GB, the
    GPU-hours have two significant figures (they printed 0.0), and a larger chunk that fits and sends
    fewer bytes is named as the one to set."""
    from pipeline.plan import report
    from pipeline.stages import plan

    cfg = load_config(["stage=plan", "parallel=fsdp2", *TINY, "plan.gpu=h100", "plan.gpus_per_node=2",
                       "plan.search=false", "run_dir=/nonexistent/run"])
    measured = {}
    p = estimate.plan(cfg, log=lambda line: None, measured=measured)
    assert (p["gpu"], p["train_images"], p["steps_per_epoch"]) == ("H100-80GB", 901, 901 // 32)
    hours = report.markdown(p).split(" GPU-hours")[0].rsplit(" ", 1)[1]
    assert float(hours) == pytest.approx(p["gpu_hours_per_epoch"], rel=0.05) and float(hours) > 0
    assert p["suggested_chunk"] is None  # not searched
    wider = estimate.measure(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, chunk_size=16)), 16)
    assert estimate.suggested_chunk(cfg, measured[8], wider) == 16  # fsdp2 gathers the weights once per chunk
    assert estimate.suggested_chunk(cfg, wider, measured[8]) is None
    assert "set train.chunk_size=16 (it fits" in report.verdict({**p, "suggested_chunk": 16})
    assert report.significant(0.00031234) == "0.00031" and report.significant(1234.5) == "1,200"
    with pytest.raises(Exception, match="could be A100-40GB or A100-80GB"):
        plan.run(load_config(["stage=plan", *TINY, "plan.gpus_per_node=2", "plan.gpu=a100"]))
    capsys.readouterr()


def test_a_plan_without_a_training_size_fails_before_simulating(tmp_path):
    cfg = load_config(["stage=plan", "data=glyphs", *TINY, "plan.gpus_per_node=2", f"run_dir={tmp_path}"])
    measured = {}
    with pytest.raises(Exception, match="data=glyphs has no known size; run stage=shard on this run_dir first"):
        estimate.plan(cfg, log=lambda line: None, measured=measured)
    assert measured == {}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "summary.json").write_text(json.dumps({"dataset": "glyphs", "splits": {"train": {"images": 640}}}))
    from pipeline.plan.dataset_size import train_images
    assert train_images(cfg) == 640


@pytest.mark.parametrize("parallel", ["none", "fsdp2"])
def test_lora_counts_the_frozen_base_as_weights_only(parallel):
    """model.lora.rank > 0 (issue 39): every weight is held, but gradients and AdamW's two moments (and
    its 4-byte step per tensor) only for the adapters and the head."""
    from pipeline.models.encoders import build_encoder

    cfg = load_config([f"parallel={parallel}", "model.depth=2", "model.embed_dim=32", "train.global_batch=4",
                       "train.chunk_size=2", "model.lora.rank=4"])
    model = build_encoder(cfg.model, cfg.seed)
    total = sum(p.numel() for p in model.parameters())
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    assert 0 < sum(trainable) < total / 10
    m = fake(cfg, 1, 2, steps=1)
    whole, sharded = ("Gradient", "Parameter", "Optstate"), ("Sharded Grad", "Sharded Param", "OptState")
    states = whole if parallel == "none" else sharded
    assert m.phase_at_peak["optimizer"][states[0]] == 4 * sum(trainable)
    assert m.at_end[states[1]] == 4 * total and m.at_end[states[2]] == 8 * sum(trainable) + 4 * len(trainable)
