"""Placing the tables again once pruning has left the ranks uneven: through a checkpoint and a resume.

Tables are placed by their dense bytes (and lookups) before training, but pruning keeps different shares of
different tables, so the ranks can end far apart (2 ranks of the Criteo-shaped benchmark: 1.4x the mean). Once no
stage changes the tables' bytes any more (:meth:`Compression.settled`), at a checkpoint boundary, the trainer
measures every table's bytes, computes the placement those bytes call for (:func:`~.placement.place_tables`), and,
when it lowers the ranks' max over mean from above ``UNEVEN`` by at least ``GAIN``, writes the checkpoint with
that placement recorded and raises :class:`TablesReplaced`. :func:`compresskit.api.run` then builds the model
again with the recorded placement and resumes from the checkpoint: the resharding resume a different rank count
already takes (DCP reads each table wherever it was written), so the run continues bit for bit, with each table
on its new rank.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..metrics import module_bytes
from .collective import Collective
from .placement import max_over_mean, place_tables

UNEVEN = 1.1   # re-place only when the ranks' table bytes are further apart than this (max over mean)
GAIN = 0.02    # ... and the new placement lowers that by at least this much


class TablesReplaced(Exception):
    """Raised by the trainer after writing a checkpoint that records a new placement (every rank raises it)."""

    def __init__(self, step: int, owners: list[int], moved: int, before: float, after: float) -> None:
        super().__init__(f"tables re-placed at step {step}: {moved} moved, rank bytes max/mean {before:.3f} -> "
                         f"{after:.3f}")
        self.step, self.owners, self.moved, self.before, self.after = step, owners, moved, before, after
        self.seconds = 0.0   # training time before it (the trainer fills it in)

    def record(self) -> dict[str, Any]:
        """What the run report keeps of it."""
        return {"step": self.step, "max_over_mean_before": self.before, "max_over_mean_after": self.after,
                "tables_moved": self.moved, "train_seconds_before": self.seconds}


def _balance(sizes: list[int], owners: list[int], world: int) -> float:
    """Max over mean of the ranks' bytes under ``owners``."""
    return max_over_mean([sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)])


def better_placement(model: nn.Module, coll: Collective) -> tuple[list[int], float, float] | None:
    """``(owners, max/mean now, max/mean after)`` when placing the tables by the bytes they hold now evens the
    ranks out enough to be worth a resume (see the module docstring), else None. A collective: every rank gets the
    same answer."""
    if not coll.distributed or not coll.table_order:
        return None
    modules = dict(model.named_modules())
    mine = torch.tensor([module_bytes(modules[name])["total"] if name in (coll.local_tables or ()) else 0
                         for name in coll.table_order], dtype=torch.int64)
    sizes = [int(b) for b in coll.all_reduce(mine)]       # every table's bytes, from its owner
    before = _balance(sizes, coll.table_owners, coll.world)
    if before <= UNEVEN:
        return None
    owners = place_tables(sizes, coll.world, coll.table_lookups)
    after = _balance(sizes, owners, coll.world)
    return (owners, before, after) if after <= before - GAIN else None


def recorded_placement(out_dir: str | None, coll: Collective) -> list[int] | None:
    """The placement the checkpoint in ``out_dir`` records, when it was written by a run on this many ranks (a
    resume on another count places afresh); None when there is none. Anything unreadable is left for the resume
    itself to report."""
    if not coll.distributed or not out_dir:
        return None
    from . import checkpoint as sharded_checkpoint

    path = sharded_checkpoint.find(out_dir)
    if path is None:
        return None
    try:
        meta = sharded_checkpoint.read_meta(path, coll)
    except Exception:   # noqa: BLE001 - the resume verifies the checkpoint and names what is wrong
        return None
    owners = meta.get("placement")
    if meta.get("world") != coll.world or not isinstance(owners, list) or not owners:
        return None
    return [int(o) for o in owners]
