"""Under torchrun (gloo): the plan's step run for real, on real tensors, under the same tracker as the
fake run. Rank 0 writes its Measurement as JSON to argv[1]; argv[2:] are config overrides."""
import dataclasses
import json
import sys

import torch.distributed as dist

from pipeline.config import load_config
from pipeline.plan.simulate import simulate

if __name__ == "__main__":
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(overrides)
    dist.init_process_group("gloo")
    m = simulate(cfg, cfg.train.chunk_size, fake=False)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(dataclasses.asdict(m), f)
    dist.barrier()
    dist.destroy_process_group()
