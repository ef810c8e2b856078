"""DASNet's C++ kernel (``wta.cpp``: winners-take-all in one pass, inference), compiled at first use and cached
(``compresskit.native_build``). Without a compiler (or with ``COMPRESSKIT_NATIVE=0``) :func:`kernels` returns
``None`` and ``wta.py``'s torch path runs instead."""
from __future__ import annotations

import os
from types import ModuleType

from ....native_build import NativeKernels

_HERE = os.path.dirname(os.path.abspath(__file__))
_NATIVE = NativeKernels("dasnet_wta", [os.path.join(_HERE, "wta.cpp")], [], "DASNet's C++ WTA kernel")


def build_directory() -> str:
    """Where the compiled kernel is cached for this source, torch version and CPU."""
    return _NATIVE.build_directory()


def kernels() -> ModuleType | None:
    """The compiled kernel module, or ``None`` when native kernels are off or cannot be built (warned once)."""
    return _NATIVE.module()
