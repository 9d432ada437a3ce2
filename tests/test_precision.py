"""train.precision and parallel.param_dtype (pipeline/parallel/precision.py): the bf16 forward under every
backend on 2 gloo processes equals one process's bf16 one-pass step within bf16 rounding; bf16
gathered weights equal fp32 ones within it; checkpoints keep fp32 weights; DeepSpeed keeps the
autocast on inside its forward on GPUs; the config checks."""
import json

import pytest
import torch
from conftest import SMALL, run_pipeline
from parallel_worker import CHUNK, PRECISION_VARIANTS, SEED, problem, sgd
from test_parallel import one_process, torchrun_script
from test_resume import fresh_finetune
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pipeline.config import ParallelConfig, load_config
from pipeline.parallel import precision
from pipeline.parallel.engine import Engine, deepspeed_config
from pipeline.parallel.preemption import EXIT_STATUS
from pipeline.errors import UserError
from pipeline.losses import set_step
from pipeline.train.two_pass import one_pass_step

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
SHARDED = ("zero1", "zero2", "zero3", "fsdp2")
COMBOS = ([f"{b}:bf16" for b in BACKENDS] + [f"{b}:bf16_comm" for b in SHARDED] + ["zero3:cuda_autocast"])
TOLERANCE = 1e-2  # of the update; measured: 2 processes two-pass vs 1 process one-pass, both bf16, 3.5e-3


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    torchrun_script(2, "tests/parallel_worker.py", str(out), "", "", ",".join(COMBOS))
    return out


def one_process_bf16() -> tuple[dict, dict]:
    """One process, the one-pass step on the whole batch, under a bf16 forward: weights before and after."""
    model, batches, loss_fn = problem("plain")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, *sgd(model), torch.device("cpu"), precision="bf16")
    for step, (images, labels) in enumerate(batches):
        set_step(loss_fn, step)
        one_pass_step(engine, images, labels, loss_fn, CHUNK, SEED, step)
    return start, model.state_dict()


def relative_error(got: dict, ref: dict, start: dict) -> float:
    update = torch.cat([(ref[n] - start[n]).flatten() for n in ref])
    error = torch.cat([(got[n].float() - ref[n]).flatten() for n in ref])
    return float(error.norm() / update.norm())


@pytest.fixture(scope="module")
def bf16_reference():
    return one_process_bf16()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_two_pass_equals_bf16_one_pass(worker_out, bf16_reference, backend):
    """2 processes, two-pass, bf16 forward == 1 process, one-pass, bf16 forward, within bf16 rounding;
    and the bf16 forward really ran: the fp32 step is farther away than that."""
    start, ref = bf16_reference
    got = torch.load(worker_out / f"{backend}-bf16.pt")
    assert set(got) == set(ref) and all(v.dtype == torch.float32 for v in got.values() if v.is_floating_point())
    assert relative_error(got, ref, start) <= TOLERANCE
    _, fp32, _ = one_process("plain")
    assert relative_error(fp32, ref, start) > 2 * TOLERANCE  # bf16 really ran (measured: 2.4e-2 from fp32)
    assert json.loads((worker_out / f"{backend}-bf16.dtypes.json").read_text()) == ["torch.float32"]


@pytest.mark.parametrize("backend", SHARDED)
def test_bf16_communication_equals_fp32_communication(worker_out, bf16_reference, backend):
    """parallel.param_dtype=bf16: the weights reach the forward as bf16 (FSDP2's gathered copies,
    DeepSpeed's bf16 module), and the update is the fp32-communication one within bf16 rounding: no
    farther from it than the bf16 forward is from the fp32 one (measured: 2.9e-2 and 2.4e-2; the
    class token, position embedding and LayerNorm weights then enter the forward rounded to bf16,
    which autocast alone leaves fp32). A lost or doubled gradient would be off by the whole update."""
    start, ref = bf16_reference
    lowered = torch.load(worker_out / f"{backend}-bf16_comm.pt")
    fp32_comm = torch.load(worker_out / f"{backend}-bf16.pt")
    _, fp32, _ = one_process("plain")
    bf16_rounding = relative_error(fp32, ref, start)
    assert json.loads((worker_out / f"{backend}-bf16_comm.dtypes.json").read_text()) == ["torch.bfloat16"]
    assert relative_error(lowered, fp32_comm, start) <= 1.5 * bf16_rounding
    assert relative_error(lowered, ref, start) <= 1.5 * bf16_rounding


@pytest.mark.parametrize("variant", PRECISION_VARIANTS)
@pytest.mark.parametrize("backend", SHARDED)
def test_checkpoints_stay_fp32(worker_out, backend, variant):
    """The checkpoint consolidates (zero_to_fp32, DCP) to exactly the trained fp32 weights, which are not
    bf16 values: no bf16 copy was saved in their place."""
    trained = torch.load(worker_out / f"{backend}-{variant}.pt")
    exported = torch.load(worker_out / f"{backend}-{variant}-exported.pt")
    for name, tensor in trained.items():
        assert tensor.dtype == torch.float32 and torch.equal(exported[name], tensor), name
    weight = trained["backbone.blocks.1.attn.qkv.weight"]
    assert not torch.equal(weight.bfloat16().float(), weight)


def test_deepspeed_keeps_cuda_autocast_on_inside_its_forward(worker_out):
    """With DeepSpeed's accelerator stubbed to cuda and CUDA autocast on outside: the config the engine
    builds for a CUDA device keeps it on inside the engine's forward; the JSON alone (no
    `torch_autocast` section) switches it off, the fp32 training this fixes."""
    found = json.loads((worker_out / "zero3-cuda_autocast.json").read_text())
    assert found["config"]["torch_autocast"]["enabled"] is True
    assert found["inside"] == {"generated": [True], "without_sections": [False]}


def test_deepspeed_config_for_a_cuda_device_carries_the_precision():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    config = deepspeed_config(ParallelConfig(name="zero3"), 4, cuda)  # auto, auto
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    fp32_weights = deepspeed_config(ParallelConfig(name="zero2", param_dtype="fp32"), 4, cuda)
    assert "bf16" not in fp32_weights and fp32_weights["torch_autocast"]["enabled"]
    fp32 = deepspeed_config(ParallelConfig(name="zero1"), 4, cuda, precision="fp32")
    assert not {"bf16", "torch_autocast"} & set(fp32)
    on_cpu = deepspeed_config(ParallelConfig(name="zero3"), 4, cpu)
    assert not {"bf16", "torch_autocast"} & set(on_cpu)
    bf16_on_cpu = deepspeed_config(ParallelConfig(name="zero3", param_dtype="bf16"), 4, cpu, precision="bf16")
    assert bf16_on_cpu["bf16"] == {"enabled": True} and bf16_on_cpu["torch_autocast"]["enabled"]


def test_deepspeed_json_may_not_set_precision(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(UserError, match="sets bf16; set train.precision and parallel.param_dtype instead"):
        deepspeed_config(ParallelConfig(name="zero2", deepspeed_config=str(path)), 4, torch.device("cpu"))


def test_resolution():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert precision.resolve("auto", cuda) == "bf16" and precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("bf16", cpu) == "bf16" and precision.resolve("fp32", cuda) == "fp32"
    assert precision.resolve_param_dtype("auto", "fsdp2", "auto", cuda) == "bf16"
    assert precision.resolve_param_dtype("auto", "zero3", "auto", cuda) == "bf16"
    assert precision.resolve_param_dtype("auto", "ddp", "auto", cuda) == "fp32"
    assert precision.resolve_param_dtype("auto", "fsdp2", "fp32", cuda) == "fp32"  # an fp32 recipe
    assert precision.resolve_param_dtype("auto", "fsdp2", "bf16", cpu) == "fp32"
    with precision.autocast(cpu, "bf16"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    with precision.autocast(cpu):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32


@pytest.fixture
def tf32_flags_kept():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_applies_to_fp32_runs_on_cuda_only(tf32_flags_kept):
    """train.tf32: what the matmuls run in (the peak the plan and perf/mfu use), and torch's switches
    (settable without a GPU), which bf16 runs and the CPU leave as they are."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert precision.matmul_precision("auto", True, cuda) == "bf16"
    assert precision.matmul_precision("fp32", True, cuda) == "tf32"
    assert precision.matmul_precision("fp32", False, cuda) == "fp32"
    assert precision.matmul_precision("auto", True, cpu) == "fp32"  # no TF32 on a CPU
    assert precision.set_tf32("fp32", True, cuda) == "tf32"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert precision.set_tf32("fp32", False, cuda) == "fp32"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    precision.set_tf32("bf16", False, cuda)
    precision.set_tf32("fp32", False, cpu)
    assert torch.backends.cuda.matmul.allow_tf32  # untouched
    assert load_config([]).train.tf32 and load_config(["recipe=rsk", "data=cub"]).train.tf32


def test_config_checks():
    cfg = load_config(["train.precision=bf16", "parallel=fsdp2", "parallel.param_dtype=bf16"])
    assert (cfg.train.precision, cfg.parallel.param_dtype) == ("bf16", "bf16")
    assert load_config([]).train.precision == "auto" and load_config([]).parallel.param_dtype == "auto"
    with pytest.raises(UserError, match="train.precision=fp16 is unknown; use one of auto, bf16, fp32"):
        load_config(["train.precision=fp16"])
    with pytest.raises(UserError, match="parallel.param_dtype=bf16 applies to fsdp2 and zero"):
        load_config(["parallel=ddp", "parallel.param_dtype=bf16"])
    with pytest.raises(UserError, match="which train.precision=fp32 forbids"):
        load_config(["parallel=zero3", "parallel.param_dtype=bf16", "train.precision=fp32"])


def checkpoint_weights(folder, tmp_path) -> dict:
    dcp_to_torch_save(folder, tmp_path / f"{folder.parent.parent.name}.pt")
    return torch.load(tmp_path / f"{folder.parent.parent.name}.pt")["model"]


@pytest.mark.slow  # 52 s: exact resume stays in the default suite in fp32 (test_resume.py)
def test_bf16_run_stopped_midway_resumes_bit_exactly(digits_run, tmp_path, monkeypatch):
    """train.precision=bf16 on the CPU: a run stopped after its first step (stop file) and run again
    ends with the same fp32 weights, bit for bit, as one that never stopped, and not with the fp32
    run's weights."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        fresh_finetune(digits_run, run)
    args = [*SMALL, "train.precision=bf16"]
    run_pipeline("stage=finetune", f"run_dir={straight}", *args)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    monkeypatch.setenv("PIPELINE_STOP_FILE", str(stop_file))
    proc = run_pipeline("stage=finetune", f"run_dir={stopped}", *args, check=False)
    assert proc.returncode == EXIT_STATUS and "preempted after step 1" in proc.stderr, proc.stderr[-3000:]
    monkeypatch.delenv("PIPELINE_STOP_FILE")
    proc = run_pipeline("stage=finetune", f"run_dir={stopped}", *args)
    assert "resuming from" in proc.stderr and "step 6/6" in proc.stderr
    a = checkpoint_weights(straight / "checkpoints" / "step_6", tmp_path)
    b = checkpoint_weights(stopped / "checkpoints" / "step_6", tmp_path)
    fp32 = checkpoint_weights(digits_run / "checkpoints" / "step_6", tmp_path)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert tensor.dtype == torch.float32 and torch.equal(b[name], tensor), name
    assert not all(torch.equal(fp32[name], tensor) for name, tensor in a.items())
