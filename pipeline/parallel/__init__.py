"""Processes and backends: the process group, the engines (DDP, DeepSpeed ZeRO, FSDP2), checkpoints, preemption.

May import config and the foundation. The backend differences live only in engine.py."""
