"""The native kernels built without AVX-512 (``COMPRESSKIT_NATIVE=portable``): the loops a CPU without AVX-512 runs
(FIITED: the index's word-at-a-time count sums, the serving kernel's portable pooling, the training forward's row
loop; DASNet: the sparse convolution's AVX2 tiles) pass the same kernel, serving, row-wise-scale, cache and DASNet
kernel tests, native against the pure-torch reference, in a subprocess. On a machine without AVX-512 the default
build is that build already."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from compresskit.plugins.dasnet import native as dasnet_native
from compresskit.plugins.fiited import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX-512 is an x86 build option")
def test_kernels_built_without_avx512_pass_the_kernel_serving_and_dasnet_tests():
    if native.kernels() is None:
        pytest.skip("no C++ compiler: the native kernels are not built here")
    if os.environ.get("COMPRESSKIT_NATIVE") == "portable":
        pytest.skip("this suite already runs on the portable build")
    env = dict(os.environ, COMPRESSKIT_NATIVE="portable")
    probe = subprocess.run(
        [sys.executable, "-c", "from compresskit.plugins.fiited import native; m = native.kernels(); "
                               "from compresskit.plugins.dasnet import native as d; k = d.kernels(); "
                               "print(m is not None and not m.built_with_avx512() and k is not None "
                               "and k.conv_block() < 64, native.build_directory())"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    last = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
    assert last.startswith("True "), probe.stdout[-1000:] + probe.stderr[-2000:]   # built, without AVX-512
    where = last.split(" ", 1)[1]
    assert where != native.build_directory()                  # a build of its own, not the AVX-512 one
    flags: list[str] = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    if {"avx512f", "avx512bw", "avx512vl", "f16c"} <= set(flags):  # this CPU's default build takes the AVX-512 loops
        assert native.kernels().built_with_avx512() and dasnet_native.kernels().conv_block() == 64
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider",
                          "tests/test_fiited_kernels.py", "tests/test_fiited_serving.py",
                          "tests/test_fiited_row_scales.py", "tests/test_fiited_cache.py",
                          "tests/test_dasnet_sparse_conv.py", "tests/test_dasnet_native_wta.py"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
    assert "could not be built" not in run.stdout      # the native cases ran on that build, not skipped
