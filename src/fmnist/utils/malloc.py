"""Keep freed memory in the process for the commands that compute at scale (train, evaluate,
bench accuracy/throughput).

glibc hands every freed block over its (dynamic) mmap threshold back to the kernel at once,
and trims the heap top as soon as 128 KiB is free. Training and evaluation free and re-allocate
a few large activation blocks every batch, so each batch gets fresh pages that the kernel must
fault in and zero. Measured together with evaluation batches of 128 (docs/decisions.md): on
the 2-core EPYC the process's system time fell from 8.1 s to
0.6 s, a `fast` epoch took 4 % less and the test-set evaluation after training 1.8x less. The
price is that the process keeps its peak heap until it exits, which is why the server and
`predict` do not call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed on 64-bit: blocks up to 32 MiB come from the heap
_TRIM_THRESHOLD = 1 << 30    # give the heap top back only when 1 GiB of it is free
_TOP_PAD = 64 << 20          # grow the heap 64 MiB at a time: fewer brk calls

tuned = False  # whether this process runs with the settings above (runinfo.environment records it)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; False (and no change) on other C libraries or platforms."""
    global tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only: musl has no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    log.debug("malloc tuned to keep freed memory: %s", ok)
    tuned = tuned or ok
    return ok
