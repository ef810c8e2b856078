"""The FIITED store's C++ kernels (training: ``prefix_bag.cpp``; serving: ``packed_bag.cpp``), compiled at first use
and cached (``compresskit.native_build``). Without a compiler (or with ``COMPRESSKIT_NATIVE=0``) :func:`kernels`
returns ``None`` and the pure-torch kernels in ``compresskit.plugins.fiited.kernels`` are used instead."""
from __future__ import annotations

import os
from types import ModuleType

from ....native_build import NativeKernels

_HERE = os.path.dirname(os.path.abspath(__file__))
_NATIVE = NativeKernels("prefix_bag", [os.path.join(_HERE, name) for name in ("prefix_bag.cpp", "packed_bag.cpp")],
                        [os.path.join(_HERE, name) for name in ("layout.h", "register_pooling.h")],
                        "FIITED's C++ kernels")


def build_directory() -> str:
    """Where the compiled kernels are cached for this source, torch version and CPU."""
    return _NATIVE.build_directory()


def kernels() -> ModuleType | None:
    """The compiled kernel module, or ``None`` when native kernels are off or cannot be built (warned once)."""
    return _NATIVE.module()
