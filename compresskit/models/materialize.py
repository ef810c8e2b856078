"""Which embedding tables this process builds: all of them, or, in a table-wise sharded run, only the ones its rank
will own (:func:`building_tables_for`), so a rank's memory follows its share from the start.

A table this process does not build lives on the ``meta`` device (shapes, no memory) and is dropped when the tables
are sharded. Its random initialisation is still drawn from the global generator (into a small scratch buffer, a
slice at a time) so that every later draw, and every table this process does build, gets exactly the values of a
one-process run (tested against the generator's state).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch

_PLACEMENT: contextvars.ContextVar[tuple[Callable[[list[int]], list[int]], int, int] | None] = \
    contextvars.ContextVar("table_placement", default=None)
_SLICE = 1 << 20          # values drawn at a time when skipping a table's initialisation (a multiple of 16)


@contextlib.contextmanager
def building_tables_for(place: Callable[[list[int]], list[int]], rank: int, local_world: int = 1
                        ) -> Iterator[None]:
    """Inside this context a model builds only the tables that ``place(sizes in bytes)`` (each table's owner rank)
    gives ``rank``; ``local_world`` ranks share this machine (node-major rank numbers, as torchrun gives them)."""
    token = _PLACEMENT.set((place, rank, max(local_world, 1)))
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def tables_to_build(sizes: list[int]) -> list[bool]:
    """Whether this process builds each of the tables of ``sizes`` bytes (all, outside :func:`building_tables_for`)."""
    placement = _PLACEMENT.get()
    if placement is None:
        return [True] * len(sizes)
    place, rank, _ = placement
    return [owner == rank for owner in place(sizes)]


def machine_bytes(sizes: list[int]) -> int:
    """Bytes of the tables of ``sizes`` that this machine's processes build: all of them in one process, the ones
    its ranks own in a sharded build (the same answer on each of them)."""
    placement = _PLACEMENT.get()
    if placement is None:
        return sum(sizes)
    place, rank, local = placement
    first = rank // local * local
    return sum(size for size, owner in zip(sizes, place(sizes)) if first <= owner < first + local)


def skip_draws(numel: int, kind: str) -> None:
    """Draw from the global generator exactly what ``normal_`` or ``uniform_`` (``kind``) of a float32 tensor of
    ``numel`` values draws (an ``nn.EmbeddingBag``'s own initialisation, DLRM's), into a scratch buffer a slice at a
    time: ``normal_`` draws its values' count, plus 16 more when that count is not a multiple of 16, so every slice
    but the last is a multiple of 16 and the last keeps the remainder (and at least 16 values)."""
    if kind not in ("normal", "uniform"):
        raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}")
    scratch = torch.empty(min(numel, 2 * _SLICE))
    left = numel
    while left > 0:
        n = left if left < 2 * _SLICE else _SLICE
        scratch[:n].normal_() if kind == "normal" else scratch[:n].uniform_()
        left -= n
