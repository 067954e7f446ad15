"""Keeping freed heap memory in the serving process, so forward passes stop paying page faults.

A forward pass allocates its activations (megabytes) and frees them when it ends. In the server that pass runs in
the batcher's thread, whose glibc arena returned the freed pages to the OS after every pass, and the next pass
faulted them back in: on small-20m under 32 clients of 16 texts, 13.6 % of the server's CPU time was the kernel
mapping and zeroing pages (perf, cpu-clock), against 0.4 % for the same passes run offline. Fixed thresholds keep
allocations under 32 MiB (glibc's own ceiling for its moving threshold) on the heap and at most `keep_bytes` of
freed memory per arena, so the pages are reused; the price is that much resident memory held after a burst.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def keep_freed_heap(keep_bytes: int) -> bool:
    """Make this process's malloc keep up to keep_bytes of freed memory per arena (glibc); False where malloc has no
    such settings (macOS, musl) or keep_bytes is 0, and then nothing changes."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if not keep_bytes or mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, min(keep_bytes, MMAP_THRESHOLD_BYTES))) and bool(
        mallopt(M_TRIM_THRESHOLD, keep_bytes))
