"""The chunk store's index: where each row's stored chunks start in the pool, in 1.125 bytes a row.

    counts [rows rounded up to 8] uint8      one a row: its stored chunks (a prefix of its chunks)
    base   [ceil(rows / 64)] int64           per block of 64 rows: the slot of the block's first chunk
    slot(r) = base[r // 64] + counts[64 * (r // 64)] + ... + counts[r - 1]

The counts are padded to whole 8-byte words (the portable kernel sums them a word at a time), not to whole blocks,
so a small table pays for its rows, not for 64. A block's counts are read as one ``[BLOCK]`` row, zeros past the
end (:func:`block_counts`), in uint8 as stored: a pass over a large table's blocks never widens them.
"""
from __future__ import annotations

import torch

BLOCK = 64         # rows a block: one int64 base a block
COUNT_ALIGN = 8    # the counts are padded to a multiple of this many rows


def index_shapes(num_rows: int) -> tuple[int, int]:
    """(length of ``counts``, number of blocks) of a table of ``num_rows`` rows."""
    return (num_rows + COUNT_ALIGN - 1) // COUNT_ALIGN * COUNT_ALIGN, (num_rows + BLOCK - 1) // BLOCK


def index_bytes(num_rows: int) -> int:
    """Bytes of the index of a table of ``num_rows`` rows."""
    counts, blocks = index_shapes(num_rows)
    return counts + 8 * blocks


def older_layout(counts_len: int, base_len: int) -> bool:
    """Whether an index of these lengths is compresskit's older layout, a base every 8 rows and the counts padded
    to whole 8-row blocks. Today's counts are eight times the bases only for tables of up to 8 rows (one base),
    where the two layouts are the same."""
    return base_len > 1 and counts_len == 8 * base_len


def padded_counts(counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The first ``num_rows`` of ``counts`` (uint8) in a ``counts`` tensor of today's length."""
    out = torch.zeros(index_shapes(num_rows)[0], dtype=torch.uint8)
    out[:num_rows] = counts[:num_rows]
    return out


def _split(counts: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the whole blocks of ``counts`` as ``[n, BLOCK]``, which of ``blocks`` are whole, the last partial block
    zero-padded to ``[BLOCK]``)."""
    whole = counts.numel() // BLOCK
    tail = torch.zeros(BLOCK, dtype=counts.dtype, device=counts.device)
    tail[:counts.numel() - whole * BLOCK] = counts[whole * BLOCK:]
    return counts[:whole * BLOCK].view(whole, BLOCK), blocks < whole, tail


def block_counts(counts: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The counts of ``blocks`` as ``[len(blocks), BLOCK]`` (uint8, as stored), zeros past the end of ``counts``."""
    full, whole, tail = _split(counts, blocks)
    if bool(whole.all()):
        return full[blocks]
    out = tail.expand(blocks.numel(), BLOCK).clone()
    out[whole] = full[blocks[whole]]
    return out


def set_block_counts(counts: torch.Tensor, blocks: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values [len(blocks), BLOCK]`` as the counts of ``blocks`` (what lies past the end is dropped)."""
    full, whole, _ = _split(counts, blocks)
    full[blocks[whole]] = values[whole].to(counts.dtype)
    if not bool(whole.all()):
        start = full.shape[0] * BLOCK
        counts[start:] = values[~whole][-1, :counts.numel() - start].to(counts.dtype)


def block_totals(counts: torch.Tensor) -> torch.Tensor:
    """Stored chunks of every block (int64 ``[blocks]``)."""
    whole = counts.numel() // BLOCK
    totals = counts[:whole * BLOCK].view(whole, BLOCK).sum(1, dtype=torch.int64)
    if counts.numel() > whole * BLOCK:
        totals = torch.cat([totals, counts[whole * BLOCK:].sum(dtype=torch.int64).reshape(1)])
    return totals


def packed_bases(counts: torch.Tensor) -> torch.Tensor:
    """The block bases of chunks stored in row order, from the rows' ``counts``."""
    totals = block_totals(counts)
    return torch.cumsum(totals, 0) - totals
