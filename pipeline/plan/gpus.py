"""Known GPUs: memory, peak bf16 FLOP/s (pipeline/models/accounting.py's table) and the bandwidth each GPU
sends at, inside a node (NVLink) and between nodes (its network card)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.models.accounting import peak_flops_of


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float         # what torch.cuda.get_device_properties(i).total_memory reports, about
    nvlink_gbps: float        # Gbit/s one direction per GPU, inside a node
    network_gbps: float       # Gbit/s per GPU between nodes (one NIC per GPU, as in NVIDIA's DGX systems)

    @property
    def peak_flops(self) -> float:
        return peak_flops_of(self.name)


# Memory: the cards' 40/80/141 GB, less what the driver keeps (total_memory, GiB). NVLink: A100 600 GB/s,
# H100/H200 900 GB/s both directions together (NVIDIA A100/H100/H200 data sheets), half each way.
# Network: DGX A100 has 8 ConnectX-6 HDR 200 Gb/s, DGX H100/H200 8 ConnectX-7 NDR 400 Gb/s (DGX data sheets).
GPUS = {g.name: g for g in (
    GPU("A100-40GB", 39.4, 2400.0, 200.0),
    GPU("A100-80GB", 79.1, 2400.0, 200.0),
    GPU("H100-80GB", 79.1, 3600.0, 400.0),
    GPU("H200", 139.8, 3600.0, 400.0),
)}


def known_name(name: str) -> str | None:
    """The table's name for `name`: the same in any case, or the one name it begins (h100 -> H100-80GB);
    a prefix of several (a100) is refused, naming them."""
    exact = [k for k in GPUS if k.lower() == name.lower()]
    found = exact or [k for k in GPUS if k.lower().startswith(name.lower())]
    if len(found) > 1:
        raise UserError(f"plan.gpu={name} could be {' or '.join(found)}; name one")
    return found[0] if found else None


def gpu(name: str, memory_gb: float | None = None) -> GPU:
    """The table's GPU of that name (any case, or a unique prefix); plan.gpu_memory_gb overrides its memory
    or stands for any other GPU."""
    name = known_name(name) or name
    if name in GPUS:
        known = GPUS[name]
        return known if memory_gb is None else GPU(known.name, memory_gb, known.nvlink_gbps, known.network_gbps)
    if memory_gb is None:
        raise UserError(f"plan.gpu={name} is not in the table ({', '.join(GPUS)}); set plan.gpu_memory_gb "
                        f"(and plan.peak_tflops, plan.bandwidth_gbps) for another GPU")
    return GPU(name, memory_gb, 0.0, 0.0)
