"""The ``method`` values of a fiited stage, each a :class:`TableMethod` in the :data:`TABLE_METHODS` registry.

Built in: ``fiited`` (the paper's chunk pruning), and the baselines it is measured against: ``adaembed``,
``mixed_dim``, ``uniform``, the hashing family ``hashing``, ``qr``, ``robe``, ``tt_rec``, and ``dense``. A package
adds one with ``TABLE_METHODS.add("mine", MyMethod)``; a recipe then selects it with ``method: mine``.
"""
from __future__ import annotations

from ....registry import Registry
from .base import TableMethod, TableSet


def _builtin() -> None:
    from .adaembed import AdaEmbed
    from .dense import Dense
    from .fiited import ChunkPruning
    from .hashing import QR, Hashing, Robe, TTRec
    from .mixed_dim import MixedDim
    from .uniform import Uniform

    for cls in (ChunkPruning, AdaEmbed, MixedDim, Uniform, Hashing, QR, Robe, TTRec, Dense):
        TABLE_METHODS.add(cls.name, cls)


TABLE_METHODS: Registry[type[TableMethod]] = Registry("fiited method", "method", _builtin)

__all__ = ["TABLE_METHODS", "TableMethod", "TableSet"]
