"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MiB, usually far less) with
a fresh mapping and unmaps it on free. A CPU training step allocates the same large activations
every time (a [8, 128, 64, 64] map is 16 MiB), so each step faults and zero-fills the same pages
again. Measured on 34 LGST steps at 256 px, 2 cores: 12 M page faults and 36 s of system time by
default, 0.36 M and 1.3 s with the settings below, and ~10 % less wall time per step.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Serve allocations up to 1 GiB from the heap and never trim it; True if glibc took it.

    For long CPU jobs that own the process (training, refitting); a no-op elsewhere (macOS,
    Windows, musl), where it returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = (
        (_M_MMAP_THRESHOLD, 1 << 30),
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, 64 << 20),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
