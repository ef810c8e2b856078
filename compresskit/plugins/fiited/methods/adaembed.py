"""``method: adaembed``: AdaEmbed (Lai et al., OSDI 2023), whole rows by importance."""
from __future__ import annotations

import torch

from ..importance import normalised_importance, whole_rows
from .base import TableMethod, TableSet


class AdaEmbed(TableMethod):
    """Every row's importance (access frequency x gradient norm, a moving average) over its table's 95th
    percentile; one global threshold. Rows cross it both ways: evicted, or re-admitted with fresh values, gradually
    during training and on after the budget is reached."""

    name = "adaembed"
    in_training = True
    adaptive = True

    def __init__(self, config, error) -> None:
        super().__init__(config, error)
        self._generators: dict[str, torch.Generator] = {}   # fresh values of re-admitted rows, one stream a table

    def track(self, table) -> None:
        table.track_utility(self.config.decay)
        table.track_candidates("row")

    def prune(self, target: int, tables: TableSet) -> int | None:
        """Rows lowest first lose their allocation until the allocated rows fit ``target`` chunks; the others
        hold (or regain) all their chunks."""
        coll, modules = tables.coll, tables.modules
        scores = [normalised_importance(m.candidate_utilities(torch.arange(m.num_embeddings))) for _, m in modules]
        full = [torch.full((m.num_embeddings,), m.num_chunks, dtype=torch.int64) for _, m in modules]
        excess = coll.sum(sum(int(f.sum()) for f in full)) - target
        drops = whole_rows(scores, full, excess, coll, tables.ids, tables.num_tables)
        grown, changed = 0, False
        for drop, f, (name, m) in zip(drops, full, modules):
            new = torch.where(drop, 0, f)
            if not torch.equal(new, m.store.row_counts()):
                changed = True
                gen = self._generators.setdefault(name, torch.Generator().manual_seed(tables.table_index(name)))
                grown += int(m.resize_rows(new, "random", gen).numel())
        return grown if coll.sum(int(changed)) else None   # a collective: every rank calls it
