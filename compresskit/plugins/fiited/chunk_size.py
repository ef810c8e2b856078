"""``chunk_size: auto``: the allocation unit of a fiited stage, chosen from its byte budget.

A chunk is the unit FIITED keeps or prunes. Coarse chunks (4 values) rank better at generous budgets and keep the
per-chunk work low, but below about one chunk a row on average most rows end up with nothing: at 2% of a dim-64
table's bytes the budget holds 1 FP32 value a row after the index, so 4-value chunks reach at most one row in four
and leave every other row's vector at zero. ``auto`` takes the largest chunk (4, 2 or 1 values, dividing every
table's dim) of which the budget holds at least one a row on average: 4 from about 6.7% of the dense bytes up at
dim 64, 2 from about 3.6%, 1 below. Quantized chunks stay at 4: their FP16 scale is per chunk, so a smaller chunk
pays more for scales than it gains.
"""
from __future__ import annotations

from .row_index import index_bytes

CANDIDATES = (4, 2, 1)


def auto_chunk_size(ratio: float, tables: list[tuple[int, int]], storage: str = "fp32") -> int:
    """The chunk size of ``chunk_size: auto`` for ``tables`` (``(rows, dim)`` of every table of the stage, over
    all ranks) at a ``ratio`` of their dense FP32 bytes (see the module docstring)."""
    sizes = [c for c in CANDIDATES if all(dim % c == 0 for _, dim in tables)]
    if storage != "fp32":
        return sizes[0]
    rows = sum(r for r, _ in tables)
    dense = sum(r * d * 4 for r, d in tables)
    values_a_row = (ratio * dense - sum(index_bytes(r) for r, _ in tables)) / 4 / max(rows, 1)
    return next((c for c in sizes if values_a_row >= c), sizes[-1])
