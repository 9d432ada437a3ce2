"""Host memory of CPU tensors: freed tensors go back to the system.

On the CPU every tensor is allocated with glibc's malloc. Above its mmap threshold a block is its own
mapping, returned at free; below it the block is carved from the heap, where a freed block is kept
for reuse and is returned only when no live block sits above it. glibc raises that threshold by
itself up to 32 MiB each time a mapped block is freed, so after the first few frees a ViT's weight
and activation tensors (1-35 MiB) all come from the heap. The backends that all-gather each block's
weights and free them again among live activations (fsdp2, zero3) then leave holes the heap cannot
give back: a dinov2_vitl14 ZeRO-3 rank peaked at 5.7 GB instead of 4.2 GB (FSDP2: 3.9 instead of
3.0), and ZeRO-3 at ViT-g/14 was OOM-killed on 2 ranks of a 24 GB machine (BENCHMARKS.md, issue 26).

Fixing the threshold (glibc's `mallopt(M_MMAP_THRESHOLD)`, which also stops its self-adjustment)
makes every block of at least THRESHOLD bytes its own mapping again, at the price of page faults on
every fresh block: one process's ViT-L/14 step took 61 s instead of 52 s with it, for no memory
saved. So `build_engine` sets it for fsdp2 and zero3 on the CPU only. Not glibc (macOS, musl):
nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
# Fixing the mmap threshold also stops glibc adjusting the trim threshold (free memory at the heap's
# top kept for reuse) from 128 KiB up to twice the mmap threshold; left at 128 KiB, a tiny ViT's step
# shrank and regrew its heap every time (0.61 s against 0.52 s). 64 MiB is where glibc's own rule ends.
TRIM_THRESHOLD = 64 << 20
THRESHOLD = 1 << 20  # 1 MiB: the smallest tensors that matter for fragmentation at ViT sizes


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def release_free_memory() -> bool:
    """Give the heap's free memory back to the system now (glibc's malloc_trim), e.g. after a large
    model was built and freed in a process that goes on. False where the C library has no such call."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim and trim(0))


def return_freed_tensors(threshold: int | None = None) -> bool:
    """Every malloc of at least `threshold` bytes (default THRESHOLD; 0 leaves glibc's own rule) is
    mapped on its own and unmapped at free, from now on in this process. True where the C library
    took the setting (glibc), False elsewhere."""
    threshold = THRESHOLD if threshold is None else threshold
    if threshold == 0:  # glibc's own rule (the benchmarks' baseline arm)
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
