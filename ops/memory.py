"""The C allocator's thresholds, fixed for the long-running processes.

glibc's malloc serves a large block (128 KiB or more, at first) with a mapping of its own,
unmapped when freed. But each time it frees such a block, it raises that threshold to the
block's size, and the heap's trim threshold to twice that, up to 32 MiB (mallopt(3), "dynamic
mmap threshold"). From then on, blocks of those sizes (a batch's query results, a burst of
messages) come from the heap, and the heap goes back to the system only from its top, once
that much is free there. Under a steady load the processor's RSS rose that way for as long as
it ran (about 0.4 MB a minute at 50 POST/s, for 30 minutes), its heap growing while what
Python itself held (tracemalloc) stayed flat.

Setting either threshold turns the adjustment off; both are set to glibc's initial values,
so large blocks keep their own mappings and the heap is trimmed as it was at the start.
MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment are glibc's own way to
choose them: either one leaves the allocator as that says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3)'s parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's initial values of both.
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 128 * 1024
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds (this module's docstring); False where the C
    library is not glibc, or the environment already chose them."""
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in ENVIRONMENT):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    fixed: bool = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                   and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not fixed:
        log.warning("could not fix the allocator's thresholds; RSS may grow under load")
    return fixed
