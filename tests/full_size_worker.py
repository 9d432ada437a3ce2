"""One two-pass step of a preset at its real size on this rank's share of a global batch of 4 (2 classes
x 2, chunk 1, grad checkpointing as the preset says), then, on rank 0 alone, one process's one-pass
step on the whole batch from the same weights; prints the per-tensor update difference as JSON,
with the build and step times and each rank's peak resident memory (the BENCHMARKS.md figures).

    torchrun --nproc_per_node 2 tests/full_size_worker.py vitg14_clip fsdp2      (tests/test_full_size.py)

Rank 0 holds at most three copies of the weights at a time (the sharded run's result, the
reference model and its gradients, then the starting weights rebuilt from the seed)."""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.dist import distributed  # noqa: E402
from pipeline.config import ParallelConfig, load_config  # noqa: E402
from pipeline.dist.distributed import world_from_env  # noqa: E402
from pipeline.dist.engine import Engine, build_engine  # noqa: E402
from pipeline.losses import RecallAtK  # noqa: E402
from pipeline.models import accounting  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train.two_pass import one_pass_step, two_pass_step  # noqa: E402

GLOBAL, CHUNK, SEED, LR = 4, 1, 3, 0.1
REPO = Path(__file__).resolve().parents[1]
# ZeRO-3 on two ranks of this 24 GB machine: with DeepSpeed's defaults both ranks passed 11 GB within
# 20 s of the step and the OOM killer ended one. Up to stage3_max_live_parameters (1e9 elements: a
# whole ViT-g/14, 4 GB in fp32) of gathered weights may stay resident, and the optimizer step copies a
# sub-group of gradients at once (sub_group_size 1e9: a rank's whole 2 GB partition); DeepSpeed
# documents both as memory traded for more gathers and smaller tiles, and its defaults fit a GPU, so
# ds_configs/zero3.json keeps them. Even so the ranks peak at about 11 GB each: vitg14_clip fits only
# when nothing else holds more than about 1 GB, dinov2_vitg14 not at all (BENCHMARKS.md, issue 26).
HOST_MEMORY = {"stage3_max_live_parameters": 100_000_000, "stage3_max_reuse_distance": 100_000_000,
               "sub_group_size": 100_000_000}


def sgd(model: torch.nn.Module):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)


def batch(size: int):
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(GLOBAL, 3, size, size, generator=gen), torch.arange(GLOBAL // 2).repeat_interleave(2)


def compare(got: dict, ref: dict, start: dict) -> dict:
    """Per tensor ||got - ref|| / ||ref - start||, over the tensors that moved (an update at least 1e-2
    of the largest), and over all weights. Why 1e-2: in clip_vitl14_hf's step a LayerNorm weight whose
    update is 2.4e-3 of the largest (its gradient a sum of 4 x 257 near-cancelling terms) differs by
    2.7% between two one-pass steps that only batch the forward differently (chunk 1 against 4), the
    same 2.7% as two-pass against one-pass: the reference's own rounding noise, not the step's
    (BENCHMARKS.md, issue 26)."""
    updates = {n: float((ref[n] - start[n]).norm()) for n in ref if ref[n].is_floating_point()}
    largest = max(updates.values())
    errors = {n: float((got[n] - ref[n]).norm()) / u for n, u in updates.items() if u >= 1e-2 * largest}
    total = sum(float((got[n] - ref[n]).norm()) ** 2 for n in updates) ** 0.5 / sum(u ** 2 for u in updates.values()) ** 0.5
    worst = max(errors, key=errors.get)
    return {"max_update_error": errors[worst], "worst_tensor": worst, "total_update_error": total,
            "tensors_compared": len(errors), "tensors": len(updates)}


def parallel_config(backend: str, folder: str) -> ParallelConfig:
    if backend != "zero3":
        return ParallelConfig(name=backend)
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"].update(HOST_MEMORY)
    path = Path(folder) / "zero3_host_memory.json"
    path.write_text(json.dumps(config))
    return ParallelConfig(name=backend, deepspeed_config=str(path))


def main(name: str, backend: str) -> None:
    world = world_from_env()
    distributed.init(world, torch.device("cpu"))
    cfg = load_config([f"model={name}"]).model
    images, labels = batch(cfg.image_size)
    loss_fn = RecallAtK(ks=(1, 2), tau_rank=0.05)
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    tic = time.perf_counter()
    model = build_encoder(cfg, seed=0).train()
    with tempfile.TemporaryDirectory() as folder:
        engine = build_engine(model, sgd, parallel_config(backend, folder), CHUNK, torch.device("cpu"), precision="fp32")
    built = time.perf_counter() - tic
    machine = accounting.matmul_flops(torch.device("cpu"))  # this process's rate, under the load of this moment
    tic = time.perf_counter()
    two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, 0)
    stepped = time.perf_counter() - tic
    got = engine.full_state_dict()
    peak = accounting.peak_memory_gb(torch.device("cpu"))  # the sharded run's, before rank 0's reference below
    peaks = [peak]
    if world.size > 1:
        peaks = [None] * world.size
        torch.distributed.all_gather_object(peaks, peak)
    del engine, model
    distributed.shutdown()
    if not world.is_main:
        return
    executed = accounting.two_pass_flops(cfg, CHUNK, GLOBAL)
    achieved = executed / world.size / stepped
    timing = {"build_s": round(built, 1), "step_s": round(stepped, 1), "s_per_image": round(stepped / GLOBAL, 1),
              "peak_rss_gb_per_rank": [round(p, 2) for p in peaks], "threads": torch.get_num_threads(),
              "executed_tflop": round(executed / 1e12, 2), "achieved_gflops_per_process": round(achieved / 1e9, 2),
              "machine_matmul_gflops_per_process": round(machine / 1e9, 2),
              "fraction_of_machine_matmul": round(achieved / machine, 3)}
    reference = build_encoder(cfg, seed=0).train()
    one_pass_step(Engine(reference, *sgd(reference), torch.device("cpu"), precision="fp32"), images, labels,
                  loss_fn, CHUNK, SEED, 0)
    ref = {k: v.detach() for k, v in reference.state_dict().items()}
    del reference
    start = build_encoder(cfg, seed=0).state_dict()
    print(json.dumps({"preset": name, "parallel": backend, "processes": world.size, **timing, **compare(got, ref, start)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
