"""The typed interface of a compressed embedding table, in one place (as TorchRec keeps its planner's types in
``planner/types.py``).

* :class:`TableBytes`: what a table holds, by what it is for. Every table module reports it from
  ``table_bytes()``, measured from its tensors; reports, the export and the benchmarks read nothing else.
* :class:`CompressedTable`: what the core may call on a table a plugin put in a model: its shape, its bytes, its
  dense equivalent and its layout record (``compresskit.layout``). A table with an inference-only form also has
  ``to_packed()``.
* :func:`bytes_of`: the :class:`TableBytes` of any table, a plain ``nn.Embedding`` / ``nn.EmbeddingBag`` included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

FLOAT_BYTES = 4


@dataclass(frozen=True)
class TableBytes:
    """Bytes an embedding table holds. ``payload + index`` is what serving needs (what a user is charged);
    ``training`` is state only training needs; ``cache`` is the part of ``payload`` that is the FP32 hot-row
    cache of a quantized table."""

    payload: int            # the values: FP32 values, or INT8 / INT4 codes and their scales (and the cache)
    index: int = 0          # what finds a row's values: FIITED's counts and bases, a remap, hash parameters
    training: int = 0       # utilities, fused optimizer state, access counts
    cache: int = 0          # of payload: the FP32 hot rows and their lookup

    @property
    def serving(self) -> int:
        """``payload + index``: the bytes a trained table needs to serve."""
        return self.payload + self.index

    @property
    def total(self) -> int:
        """Everything held: ``payload + index + training``."""
        return self.payload + self.index + self.training

    def __add__(self, other: "TableBytes") -> "TableBytes":
        return TableBytes(self.payload + other.payload, self.index + other.index, self.training + other.training,
                          self.cache + other.cache)

    def as_dict(self) -> dict[str, int]:
        """The four fields, ``serving`` and ``total`` (for reports and JSON)."""
        return {**asdict(self), "serving": self.serving, "total": self.total}


@runtime_checkable
class CompressedTable(Protocol):
    """A table a plugin puts in place of an ``nn.EmbeddingBag`` / ``nn.Embedding``."""

    num_embeddings: int
    embedding_dim: int

    def table_bytes(self) -> TableBytes:
        """What the table holds, measured from its tensors."""

    def to_dense(self) -> nn.Module:
        """The ``nn.EmbeddingBag`` / ``nn.Embedding`` it stands for (same outputs)."""

    def record_args(self) -> dict[str, Any]:
        """What rebuilds it from a layout record (``compresskit.layout``)."""


def dense_bytes(table: nn.Module) -> int:
    """Bytes of the FP32 dense table ``table`` stands for (``num_embeddings x embedding_dim``; a module standing for
    several, its own ``dense_bytes()``)."""
    if callable(getattr(table, "dense_bytes", None)):
        return int(table.dense_bytes())
    return int(table.num_embeddings) * int(table.embedding_dim) * FLOAT_BYTES


def bytes_of(table: nn.Module) -> TableBytes:
    """``table.table_bytes()``; for a module without it (a plain ``nn.Embedding`` / ``nn.EmbeddingBag``), its
    weight as payload."""
    if callable(getattr(table, "table_bytes", None)):
        return table.table_bytes()
    weight = table.weight
    return TableBytes(payload=weight.numel() * weight.element_size())
