"""Host memory of CPU tensors: freed tensors go back to the system.

On the CPU every tensor is allocated with glibc's malloc. Above its mmap threshold a block is its own
mapping, returned at free; below it the block is carved from the heap, where a freed block is kept
for reuse and is returned only when no live block sits above it. glibc raises that threshold by
itself up to 32 MiB each time a mapped block is freed, so after the first few frees a ViT's weight
and activation tensors (1-35 MiB) all come from the heap, and the gathers and frees of a ZeRO-3 step
leave holes the heap cannot give back: a dinov2_vitl14 ZeRO-3 rank peaked at 5.5 GB instead of
3.3 GB, and a ViT-g/14 rank was OOM-killed on this 24 GB machine (BENCHMARKS.md, issue 26).

Fixing the threshold (glibc's `mallopt(M_MMAP_THRESHOLD)`, which also stops its self-adjustment)
makes every block of at least THRESHOLD bytes its own mapping again. The cost is a page fault per
fresh page of those blocks: within the noise on the demo's step (BENCHMARKS.md). Not glibc (macOS,
musl): nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
# Fixing the mmap threshold also stops glibc adjusting the trim threshold (free memory at the heap's
# top kept for reuse) from 128 KiB up to twice the mmap threshold; left at 128 KiB, the tiny ViT's demo
# step shrank and regrew its heap every step, 16% slower. 64 MiB is where glibc's own rule ends.
TRIM_THRESHOLD = 64 << 20
THRESHOLD = 1 << 20  # 1 MiB: the smallest tensors that matter for fragmentation at ViT sizes


def return_freed_tensors(threshold: int | None = None) -> bool:
    """Every malloc of at least `threshold` bytes (default THRESHOLD) is mapped on its own and unmapped
    at free, from now on in this process. True where the C library took the setting (glibc), False
    elsewhere."""
    threshold = THRESHOLD if threshold is None else threshold
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
