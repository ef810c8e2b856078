"""The FIITED store's C++ kernels, compiled at first use with ``torch.utils.cpp_extension`` and cached.

Compiling at first use (not at ``pip install``) keeps installation free of a torch build dependency, which pip's
build isolation would satisfy with a different torch. The build goes to ``$COMPRESSKIT_BUILD_DIR`` or
``~/.cache/compresskit/``, keyed by the source, the torch version and the CPU, so a later process loads it in
milliseconds. Without a compiler (or with ``COMPRESSKIT_NATIVE=0``) :func:`kernels` returns ``None`` and the
pure-torch kernels in ``compresskit.plugins.fiited.kernels`` are used instead. ``COMPRESSKIT_NATIVE=portable``
builds them without AVX-512 (the portable loops a CPU without it runs; the tests use it to check those loops on
this machine too).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from types import ModuleType

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, name) for name in ("prefix_bag.cpp", "packed_bag.cpp")]  # training, serving
_HEADERS = [os.path.join(_HERE, name) for name in ("layout.h", "register_pooling.h")]
# -fopenmp: at::parallel_for is an inline OpenMP loop in ATen's headers; compiled without it, every kernel ran on one
# thread whatever torch.set_num_threads said (the extension then links the libgomp.so.1 torch already loaded)
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_state: dict[str, ModuleType | None] = {}


def _flags() -> list[str]:
    """The compiler flags: ``-march=native``, without AVX-512 when ``COMPRESSKIT_NATIVE=portable``."""
    portable = os.environ.get("COMPRESSKIT_NATIVE") == "portable" and platform.machine().lower() in ("x86_64", "amd64")
    return _FLAGS + (["-mno-avx512f"] if portable else [])


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build_directory() -> str:
    """Where the compiled kernels are cached for this source, torch version and CPU."""
    import torch

    digest = hashlib.sha256()
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(torch.__version__.encode() + _cpu_signature().encode() + " ".join(_flags()).encode())
    key = digest.hexdigest()[:16]
    root = os.environ.get("COMPRESSKIT_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "compresskit")
    return os.path.join(root, f"prefix_bag-{key}")


def kernels() -> ModuleType | None:
    """The compiled kernel module, or ``None`` when native kernels are off or cannot be built (warned once)."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("COMPRESSKIT_NATIVE", "1") != "0":
        try:
            from torch.utils.cpp_extension import load

            path = build_directory()
            os.makedirs(path, exist_ok=True)
            if not os.path.exists(os.path.join(path, "compresskit_prefix_bag.so")):
                logging.getLogger(__name__).warning(
                    "compresskit: compiling FIITED's C++ kernels into %s (about 30 s with 2 cores; once per source, "
                    "torch version and CPU)", path)
            module = load(name="compresskit_prefix_bag", sources=_SOURCES, extra_cflags=_flags(),
                          extra_ldflags=["-fopenmp"], build_directory=path, verbose=False)
        except Exception as e:  # no compiler, no headers, ...: the pure-torch kernels still work
            warnings.warn(f"compresskit: FIITED native kernels unavailable ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the pure-torch "
                          f"kernels (slower). Set COMPRESSKIT_NATIVE=0 to silence this.", RuntimeWarning,
                          stacklevel=2)
    _state["module"] = module
    return module
