"""Which rank owns each embedding table: bytes (memory) and lookups (work) balanced together.

Balancing bytes alone puts the few large tables of a Criteo-shaped model on one rank and the many small ones on
the other: on the Criteo-Kaggle shapes with 2 ranks that gave one rank 23 of the 26 tables, so it pooled 23/26 of
every batch's lookups while the other waited. A table's lookups do not depend on its size, so both have to be
balanced (TorchRec's planner weighs compute and memory for the same reason).

Each table has two loads, its bytes and its lookups per sample, each normalised so that an even split puts 1 on
every rank. A rank's load is the larger of its two sums; the placement minimises the largest rank load, then the
largest rank's bytes, then the sum of squared rank loads. Three greedy starts (largest table first, by the larger of its two loads, by bytes, by
lookups; each onto the rank whose load stays lowest) are each improved by moving single tables, or swapping pairs
(up to ``SWAP_LIMIT`` tables), while that lowers the objective; the best result wins. Every rank computes the same
placement from the same numbers.
"""
from __future__ import annotations

from typing import Sequence

SWAP_LIMIT = 256   # tables up to which pairwise swaps are tried too (a pass costs their square)


def max_over_mean(held: Sequence[float]) -> float:
    """The largest of the ranks' loads over their mean (1.0: even; also for nothing held)."""
    mean = sum(held) / len(held) if held else 0
    return max(held) / mean if mean else 1.0


def _objective(bytes_load: list[float], work_load: list[float]) -> tuple[float, ...]:
    """(largest rank load, largest rank bytes, sum of squared rank loads): what placement minimises, in that order
    (memory is the scarcer of the two, so of placements with the same peak the one with fewer bytes on its fullest
    rank wins)."""
    loads = [max(b, w) for b, w in zip(bytes_load, work_load)]
    return max(loads), max(bytes_load), sum(x * x for x in loads)


def _better(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether objective ``a`` is lower than ``b`` (lexicographically, beyond rounding)."""
    for x, y in zip(a, b):
        if x < y - 1e-12:
            return True
        if x > y + 1e-12:
            return False
    return False


class _Placement:
    """Owners and the per-rank loads they give, with the moves local search tries."""

    def __init__(self, b: list[float], w: list[float], world: int, order: list[int]) -> None:
        self.b, self.w, self.world = b, w, world
        self.owners = [0] * len(b)
        self.bytes_load, self.work_load = [0.0] * world, [0.0] * world
        for t in order:                     # greedy: onto the rank whose load stays lowest
            r = min(range(world), key=lambda k: (max(self.bytes_load[k] + b[t], self.work_load[k] + w[t]),
                                                 self.bytes_load[k] + self.work_load[k], k))
            self.owners[t] = r
            self.bytes_load[r] += b[t]
            self.work_load[r] += w[t]

    def _move(self, t: int, r: int, loads: tuple[list[float], list[float]] | None = None) -> None:
        bl, wl = loads or (self.bytes_load, self.work_load)
        bl[self.owners[t]] -= self.b[t]
        wl[self.owners[t]] -= self.w[t]
        bl[r] += self.b[t]
        wl[r] += self.w[t]

    def objective(self) -> tuple[float, ...]:
        """What this placement scores (:func:`_objective`)."""
        return _objective(self.bytes_load, self.work_load)

    def _after(self, moves: list[tuple[int, int]]) -> tuple[float, ...]:
        loads = (list(self.bytes_load), list(self.work_load))
        for t, r in moves:
            self._move(t, r, loads)
        return _objective(*loads)

    def improve(self) -> "_Placement":
        """Apply the best single move or pair swap while one lowers the objective."""
        count, owners = len(self.b), self.owners
        for _ in range(4 * count + 8):        # each pass strictly improves; this bounds the passes
            best, best_moves = self.objective(), None
            candidates = [[(t, r)] for t in range(count) for r in range(self.world) if r != owners[t]]
            if count <= SWAP_LIMIT:
                candidates += [[(s, owners[t]), (t, owners[s])] for s in range(count) for t in range(s + 1, count)
                               if owners[s] != owners[t]]
            for moves in candidates:
                value = self._after(moves)
                if _better(value, best):
                    best, best_moves = value, moves
            if best_moves is None:
                break
            for t, r in best_moves:
                self._move(t, r)
            for t, r in best_moves:
                owners[t] = r
        return self


def place_tables(sizes: Sequence[int], world: int, lookups: Sequence[float] | None = None) -> list[int]:
    """Owner rank of every table, balancing its ``sizes`` (bytes) and ``lookups`` (ids looked up per sample:
    the features that read it; default 1 a table) over ``world`` ranks together (see the module docstring)."""
    count = len(sizes)
    lookups = [1.0] * count if lookups is None else list(lookups)
    if len(lookups) != count:
        raise ValueError(f"got {count} table sizes and {len(lookups)} lookup counts; expected one of each a table")
    total_bytes, total_work = float(sum(sizes)) or 1.0, float(sum(lookups)) or 1.0
    b = [s * world / total_bytes for s in sizes]
    w = [x * world / total_work for x in lookups]
    orders = [sorted(range(count), key=key) for key in (lambda i: (-max(b[i], w[i]), -b[i], i),
                                                         lambda i: (-b[i], -w[i], i),
                                                         lambda i: (-w[i], -b[i], i))]
    best = None
    for order in orders:
        found = _Placement(b, w, world, order).improve()
        if best is None or _better(found.objective(), best.objective()):
            best = found
    return best.owners
