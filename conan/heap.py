"""Keeping freed heap memory in a process that runs forward passes on CPU, so passes stop paying page faults.

A forward pass allocates its activations (megabytes to hundreds of megabytes) and frees them when it ends. glibc's
malloc handed them back to the OS (large blocks are mmapped and unmapped; a thread's arena is trimmed), and the next
pass faulted them back in. Measured on small-20m's widths:
- the server under 32 clients of 16 texts: 13.6 % of its CPU time was the kernel mapping and zeroing pages (perf,
  cpu-clock), against 0.4 % for the same passes run offline;
- offline `Encoder.encode` of XQuAD paragraphs (passes of 64, 6 layers): 1,400–2,100 page faults a text, 87–95
  texts/s on 2 threads; keeping 512 MiB (allocations up to 256 MiB on the heap), 94–106 a text and 105–107 texts/s.
Fixed thresholds keep allocations up to keep_bytes / 2 on the heap and at most keep_bytes of freed memory at an
arena's top, so the pages are reused; the price is that much resident memory held after a burst.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_heap(keep_bytes: int) -> bool:
    """Make this process's malloc keep up to keep_bytes of freed memory, serving allocations up to keep_bytes / 2 from
    the heap (glibc); False where malloc has no such settings (macOS, musl) or keep_bytes is 0, and then nothing
    changes."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if not keep_bytes or mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, keep_bytes // 2)) and bool(mallopt(M_TRIM_THRESHOLD, keep_bytes))
