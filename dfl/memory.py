"""Process memory settings for CPU training.

A training step allocates and frees the same large activation buffers every step. glibc serves
allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and returns them
on free, so each step page-faults and zeroes them again: on a 3 s ``can_paper`` step, about 40 000
page faults and 10–15 % of the step. :func:`keep_freed_memory` makes glibc serve them from its heap
and keep freed memory for reuse; the process then stays at its peak resident size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit
TRIM_THRESHOLD = 1 << 30  # give memory back only when 1 GiB lies free at the top of the heap


def keep_freed_memory() -> bool:
    """Have glibc keep freed buffers of up to 32 MiB for reuse; False (and no change) without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("dfl: mallopt refused the memory settings; freed memory goes back to the OS")
        return False
    return True


def configure_freed_memory(keep: bool) -> None:
    """The ``keep_freed_memory`` setting of ``dfl-train`` and ``dfl-pretrain``: keep freed buffers when true."""
    if keep and keep_freed_memory():
        log.info("glibc keeps freed buffers for reuse (keep_freed_memory=true)")
