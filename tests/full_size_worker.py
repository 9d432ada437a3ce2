"""The full-size two-pass step and its reference, each in its own process (tests/test_full_size.py).

    torchrun --nproc_per_node 2 tests/full_size_worker.py step vitg14_clip fsdp2 OUT
        one two-pass step of the preset at its real size on this rank's share of a global batch of 4
        (2 classes x 2, chunk 1, grad checkpointing as the preset says); rank 0 writes the weights after
        it to OUT/weights.safetensors and prints the build and step times, each rank's peak resident
        memory (built, and in the step alone) and the FLOP/s figures as JSON (BENCHMARKS.md).
    python tests/full_size_worker.py reference vitg14_clip OUT
        one process's one-pass step on the whole batch from the same weights; prints the per-tensor
        update difference against OUT/weights.safetensors as JSON.

Two processes because a process that has run DeepSpeed ZeRO-3 keeps its partitions after the engine
is deleted (its parameters stay referenced), and a ViT-g/14 reference beside them was 21 GB on rank
0. The reference holds at most two copies of the weights at a time (the model and its gradients,
then the weights after the step and the starting weights rebuilt from the seed); the sharded result
is read tensor by tensor from the file."""
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.parallel import distributed  # noqa: E402
from pipeline.config import ParallelConfig, load_config  # noqa: E402
from pipeline.parallel.distributed import world_from_env  # noqa: E402
from pipeline.parallel.engine import Engine, build_engine  # noqa: E402
from pipeline.losses import RecallAtK  # noqa: E402
from pipeline.models import accounting  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train.two_pass import one_pass_step, two_pass_step  # noqa: E402

GLOBAL, CHUNK, SEED, LR = 4, 1, 3, 0.1
WEIGHTS = "weights.safetensors"  # the sharded step's result, written by rank 0


def sgd(model: torch.nn.Module):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)


def batch(size: int):
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(GLOBAL, 3, size, size, generator=gen), torch.arange(GLOBAL // 2).repeat_interleave(2)


# A tensor of a transformer block (timm `blocks.N.`, open_clip `resblocks.N.`, transformers `layer.N.`/`layers.N.`).
IN_BLOCK = re.compile(r"(^|\.)(blocks|resblocks|layer|layers)\.\d+\.")


def compare(got: dict, ref: dict, start: dict) -> dict:
    """Per tensor ||got - ref|| / ||ref - start||, over the tensors that moved (an update at least 1e-2
    of the largest), and over all weights. Why 1e-2: in clip_vitl14_hf's step a LayerNorm weight whose
    update is 2.4e-3 of the largest (its gradient a sum of 4 x 257 near-cancelling terms) differs by
    2.7% between two one-pass steps that only batch the forward differently (chunk 1 against 4), the
    same 2.7% as two-pass against one-pass: the reference's own rounding noise, not the step's
    (BENCHMARKS.md, issue 26). The same over the blocks' tensors alone (`max_block_update_error`, the
    largest being the largest block update): where one tensor after the blocks takes nearly the whole
    update (timm initialises EVA's and PE's projection at 1e-3 of its scale, so at random init the
    gradients behind it are 1e-3 of its own), the first rule compares that tensor alone."""
    updates = {n: float((ref[n] - start[n]).norm()) for n in ref if ref[n].is_floating_point()}
    errors, worst = _errors(got, ref, updates)
    blocks, worst_block = _errors(got, ref, {n: u for n, u in updates.items() if IN_BLOCK.search(n)})
    total = sum(float((got[n] - ref[n]).norm()) ** 2 for n in updates) ** 0.5 / sum(u ** 2 for u in updates.values()) ** 0.5
    return {"max_update_error": errors[worst], "worst_tensor": worst, "total_update_error": total,
            "tensors_compared": len(errors), "tensors": len(updates),
            "max_block_update_error": blocks[worst_block] if blocks else None, "worst_block_tensor": worst_block,
            "block_tensors_compared": len(blocks)}


def _errors(got: dict, ref: dict, updates: dict) -> tuple[dict, str | None]:
    """||got - ref|| / update of the tensors whose update is at least 1e-2 of the largest in `updates`; the worst."""
    if not updates:
        return {}, None
    largest = max(updates.values())
    errors = {n: float((got[n] - ref[n]).norm()) / u for n, u in updates.items() if u >= 1e-2 * largest}
    return errors, max(errors, key=errors.get)


def step(name: str, backend: str, out: str) -> None:
    world = world_from_env()
    distributed.init(world, torch.device("cpu"))
    cfg = load_config([f"model={name}"]).model
    images, labels = batch(cfg.image_size)
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    tic = time.perf_counter()
    model = build_encoder(cfg, seed=0).train()
    engine = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"), precision="fp32")
    built, built_peak = time.perf_counter() - tic, accounting.peak_memory_gb(torch.device("cpu"))
    machine = accounting.matmul_flops(torch.device("cpu"))  # this process's rate, under the load of this moment
    accounting.reset_peak_memory(torch.device("cpu"))
    tic = time.perf_counter()
    two_pass_step(engine, images[share], labels[share], RecallAtK(ks=(1, 2), tau_rank=0.05), CHUNK, SEED, 0)
    stepped, step_peak = time.perf_counter() - tic, accounting.peak_memory_gb(torch.device("cpu"))
    peaks = distributed.gather_rows(torch.tensor([[built_peak, step_peak]], dtype=torch.float64)).tolist()
    got = engine.full_state_dict()  # collective; rank 0 alone gets the weights
    if world.is_main:
        save_file(got, str(Path(out) / WEIGHTS))
    distributed.shutdown()
    if not world.is_main:
        return
    executed = accounting.two_pass_flops(cfg, CHUNK, GLOBAL)
    achieved = executed / world.size / stepped
    print(json.dumps({"preset": name, "parallel": backend, "processes": world.size, "build_s": round(built, 1),
                      "step_s": round(stepped, 1), "s_per_image": round(stepped / GLOBAL, 1),
                      "built_peak_rss_gb_per_rank": [round(b, 2) for b, _ in peaks],
                      "step_peak_rss_gb_per_rank": [round(s, 2) for _, s in peaks], "threads": torch.get_num_threads(),
                      "executed_tflop": round(executed / 1e12, 2),
                      "achieved_gflops_per_process": round(achieved / 1e9, 2),
                      "machine_matmul_gflops_per_process": round(machine / 1e9, 2),
                      "fraction_of_machine_matmul": round(achieved / machine, 3)}))


def reference(name: str, out: str) -> None:
    cfg = load_config([f"model={name}"]).model
    images, labels = batch(cfg.image_size)
    model = build_encoder(cfg, seed=0).train()
    one_pass_step(Engine(model, *sgd(model), torch.device("cpu"), precision="fp32"), images, labels,
                  RecallAtK(ks=(1, 2), tau_rank=0.05), CHUNK, SEED, 0)
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    del model  # and its gradients
    start = build_encoder(cfg, seed=0).state_dict()
    with safe_open(str(Path(out) / WEIGHTS), framework="pt") as got:
        print(json.dumps(compare(Weights(got), ref, start)))


class Weights:
    """A safetensors file as a read-only mapping of its tensors, each read when asked for."""

    def __init__(self, handle):
        self.handle = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


if __name__ == "__main__":
    {"step": step, "reference": reference}[sys.argv[1]](*sys.argv[2:])
