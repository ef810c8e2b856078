"""``method: hashing | qr | robe | tt_rec``: the hashing family (``fiited/hashing.py``), each table in its natural
form within its share of the bytes."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..hashing import HASHED_TABLES, share_budget
from .base import TableMethod, TableSet


class _HashingFamily(TableMethod):
    """Each table gets ``min(dense bytes, cap)`` (at least what its form needs), one cap over every table of the
    model (every rank's, so a sharded run sizes them as one process); seeds follow the table order."""

    table: ClassVar[type]

    def replace(self, model: nn.Module, tables: TableSet, budget_bytes: int, ctx) -> list[nn.Module]:
        index = {name: tables.table_index(name) for name, _ in tables.modules}
        shapes = sorted(sum(tables.coll.all_gather_object(
            [(index[name], m.num_embeddings, m.embedding_dim) for name, m in tables.modules]), []))
        shares = share_budget([(r, d) for _, r, d in shapes], budget_bytes, self.table.minimum_bytes)
        share_of = {t: share for (t, _, _), share in zip(shapes, shares)}
        return [self.table.from_budget(m, share_of[index[name]], seed=index[name]) for name, m in tables.modules]


class Hashing(_HashingFamily):
    """The hashing trick: ids hashed into a smaller table."""

    name = "hashing"
    table = HASHED_TABLES[name]


class QR(_HashingFamily):
    """Quotient-remainder embeddings (DLRM's ``qr_embedding_bag``)."""

    name = "qr"
    table = HASHED_TABLES[name]


class Robe(_HashingFamily):
    """ROBE: one shared array read in blocks at hashed offsets."""

    name = "robe"
    table = HASHED_TABLES[name]


class TTRec(_HashingFamily):
    """TT-Rec: tensor-train cores."""

    name = "tt_rec"
    table = HASHED_TABLES[name]
