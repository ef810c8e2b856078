"""C++ kernels compiled at first use with ``torch.utils.cpp_extension`` and cached (FIITED's, DASNet's).

Compiling at first use (not at ``pip install``) keeps installation free of a torch build dependency, which pip's
build isolation would satisfy with a different torch. A build goes to ``$COMPRESSKIT_BUILD_DIR`` or
``~/.cache/compresskit/``, keyed by the sources, the torch version, the CPU and the flags, so a later process loads
it in milliseconds. Without a compiler (or with ``COMPRESSKIT_NATIVE=0``) :meth:`NativeKernels.module` returns
``None`` and the callers' pure-torch paths run instead. ``COMPRESSKIT_NATIVE=portable`` builds without AVX-512 (the
portable loops a CPU without it runs; the tests use it to check those loops on this machine too).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from types import ModuleType

# -fopenmp: at::parallel_for is an inline OpenMP loop in ATen's headers; compiled without it, every kernel ran on one
# thread whatever torch.set_num_threads said (the extension then links the libgomp.so.1 torch already loaded)
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def compiler_flags() -> list[str]:
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


class NativeKernels:
    """One extension module: ``sources`` (and the ``headers`` they include) built as ``compresskit_<name>``."""

    def __init__(self, name: str, sources: list[str], headers: list[str], what: str) -> None:
        self.name, self.sources, self.headers, self.what = name, sources, headers, what
        self._module: list[ModuleType | None] = []

    def build_directory(self) -> str:
        """Where the compiled module is cached for these sources, this torch version, CPU and flags."""
        import torch

        digest = hashlib.sha256()
        for path in self.sources + self.headers:
            with open(path, "rb") as f:
                digest.update(f.read())
        digest.update(torch.__version__.encode() + _cpu_signature().encode() + " ".join(compiler_flags()).encode())
        root = os.environ.get("COMPRESSKIT_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "compresskit")
        return os.path.join(root, f"{self.name}-{digest.hexdigest()[:16]}")

    def module(self) -> ModuleType | None:
        """The compiled module, or ``None`` when native kernels are off or cannot be built (warned once)."""
        if self._module:
            return self._module[0]
        module = None
        if os.environ.get("COMPRESSKIT_NATIVE", "1") != "0":
            try:
                from torch.utils.cpp_extension import load

                path = self.build_directory()
                os.makedirs(path, exist_ok=True)
                if not os.path.exists(os.path.join(path, f"compresskit_{self.name}.so")):
                    logging.getLogger(__name__).warning(
                        "compresskit: compiling %s into %s (once per source, torch version and CPU)", self.what, path)
                module = load(name=f"compresskit_{self.name}", sources=self.sources, extra_cflags=compiler_flags(),
                              extra_ldflags=["-fopenmp"], build_directory=path, verbose=False)
            except Exception as e:  # no compiler, no headers, ...: the pure-torch paths still work
                warnings.warn(f"compresskit: {self.what} unavailable ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the pure-torch "
                              f"path (slower). Set COMPRESSKIT_NATIVE=0 to silence this.", RuntimeWarning,
                              stacklevel=3)
        self._module.append(module)
        return module
