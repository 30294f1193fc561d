"""ops/memory.py: glibc's malloc keeps serving large blocks with mappings of their own once a
long-running process fixed its thresholds, however large a block it freed before."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

# Frees a 4 MiB block (which raises glibc's dynamic mmap threshold past 1 MiB, unless the
# thresholds are fixed), then prints whether a 1 MiB block got a mapping of its own.
PROBE = """
import ctypes, sys
from ops import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
fixed = memory.fix_malloc_thresholds() if sys.argv[1] == "fix" else None
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(fixed, mapped)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_without_the_fix_a_freed_large_block_lets_the_next_ones_come_from_the_heap() -> None:
    assert _probe("leave") == ("None", 0)


def test_fixed_thresholds_keep_large_blocks_in_mappings_of_their_own() -> None:
    assert _probe("fix") == ("True", 1)


def test_thresholds_chosen_in_the_environment_are_left_alone() -> None:
    assert _probe("fix", MALLOC_MMAP_THRESHOLD_=str(8 << 20)) == ("False", 0)
