"""keep_freed_memory: after it, glibc serves a 20 MiB tensor from the heap (not a fresh mmap) and keeps the heap
when it is freed. Measured with glibc's own counters in a fresh process (the setting is process wide)."""
from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

import compresskit
from compresskit.allocator import _glibc

PROBE = """
import ctypes, json, sys
import torch
import compresskit

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(sys.argv[2])
libc.mallinfo2.restype = MallInfo2
applied = compresskit.keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
t = torch.empty(5 * 1024 * 1024)
during = libc.mallinfo2()
del t
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": during.hblkhd - before.hblkhd, "kept": after.arena - before.arena}))
"""


def _probe(mode: str) -> dict:
    libc = ctypes.util.find_library("c") or "libc.so.6"
    out = subprocess.run([sys.executable, "-c", PROBE, mode, libc], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_keep_freed_memory_serves_from_and_keeps_the_heap():
    mib = 1024 * 1024
    default = _probe("default")
    assert default["mmapped"] >= 20 * mib and default["kept"] < mib        # glibc default: mmap, handed back
    kept = _probe("keep")
    assert kept["applied"] is True
    assert kept["mmapped"] == 0 and kept["kept"] >= 19 * mib                # heap block, kept after free


def test_keep_freed_memory_rejects_bad_threshold():
    with pytest.raises(ValueError, match="trim_threshold must be in"):
        compresskit.keep_freed_memory(0)
