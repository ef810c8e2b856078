"""DASNet's C++ kernels, compiled at first use and cached (``compresskit.native_build``): ``wta.cpp`` (winners-take-all
in one pass, masked or compact, inference) and ``sparse_conv.cpp`` (a convolution over only the kept input channels,
for per-channel WTA), bound in ``module.cpp``. Without a compiler (or with ``COMPRESSKIT_NATIVE=0``) :func:`kernels` returns
``None`` and ``wta.py``'s torch path runs instead."""
from __future__ import annotations

import os
from types import ModuleType

import torch

from ....native_build import NativeKernels

_HERE = os.path.dirname(os.path.abspath(__file__))
_NATIVE = NativeKernels("dasnet", [os.path.join(_HERE, name) for name in ("module.cpp", "wta.cpp", "sparse_conv.cpp")],
                        [], "DASNet's C++ kernels")


def build_directory() -> str:
    """Where the compiled kernels are cached for these sources, torch version and CPU."""
    return _NATIVE.build_directory()


def kernels() -> ModuleType | None:
    """The compiled kernel module, or ``None`` when native kernels are off or cannot be built (warned once)."""
    return _NATIVE.module()


_USE_NATIVE = [True]


def use_native(enabled: bool) -> None:
    """Use the native kernels where they apply (default), or always the torch paths (tests compare the two)."""
    _USE_NATIVE[0] = bool(enabled)


def available() -> bool:
    """Whether the native kernels are on (``use_native``) and built."""
    return _USE_NATIVE[0] and kernels() is not None


def kernels_for(x: torch.Tensor, contiguous: bool = True) -> ModuleType | None:
    """The kernel module where it may run on ``x``: inference (no autograd, not compiling or tracing) on a float32
    CPU tensor (with ``contiguous``: contiguous or channels-last), native kernels on and built; else None (the
    torch ops run)."""
    if _USE_NATIVE[0] and not torch.is_grad_enabled() and type(x) is torch.Tensor and x.dtype == torch.float32 \
            and x.device.type == "cpu" and x.dim() >= 2 and x.shape[1] > 0 \
            and (not contiguous or x.is_contiguous()
                 or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))) \
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        return kernels()
    return None
