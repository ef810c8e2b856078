"""``method: fiited``: the paper's chunk-level pruning by decayed chunk utility; with ``regrow``, pruned chunks whose
rows earn more than the threshold come back and rounds go on at the target."""
from __future__ import annotations

import torch

from ..importance import WEIGHT_SIGNALS, chunk_scores, chunk_utilities, regrowth_grid, tail_counts
from .base import TableMethod, TableSet


class ChunkPruning(TableMethod):
    """FIITED: one threshold over every table's chunk scores (utility**exponent, discounted by position in the
    row); each row keeps the prefix of its chunks above it."""

    name = "fiited"
    in_training = True
    ranks_chunks = True

    @property
    def regrow(self) -> bool:
        return self.config.regrow and not self.config.lazy

    @property
    def adaptive(self) -> bool:
        return self.regrow

    def track(self, table) -> None:
        table.track_utility(self.config.decay)
        if self.config.utility == "per_access":
            table.track_access()
        if self.regrow:
            table.track_candidates("chunk")

    def prune(self, target: int, tables: TableSet) -> int | None:
        cfg, coll, modules = self.config, tables.coll, tables.modules
        by_access = cfg.utility == "per_access"
        signal = cfg.utility if cfg.utility in WEIGHT_SIGNALS else "gradient"
        grids = [regrowth_grid(m, by_access) if self.regrow else chunk_utilities(m, by_access, signal)
                 for _, m in modules]
        wanted = coll.sum(sum(int(ext.sum()) for _, ext, _ in grids))     # stored chunks plus candidates
        excess = wanted - target
        if excess <= 0 and wanted == coll.sum(sum(m.store.live for _, m in modules)):   # no candidates either
            return None
        scores = [chunk_scores(u, cfg.utility_exponent, cfg.position_discount, inplace=True) for _, _, u in grids]
        width = coll.max(max((m.num_chunks for _, m in modules), default=0))
        cuts = tail_counts(scores, max(excess, 0), coll, tables.ids, tables.num_tables, width)
        del scores
        owners = [(rows, ext) for rows, ext, _ in grids]
        del grids  # the score grids go before the stores repack
        return sum(self._apply_cut(m, rows, ext - cut) for (rows, ext), cut, (_, m) in zip(owners, cuts, modules))

    def _apply_cut(self, table, rows: torch.Tensor, kept: torch.Tensor) -> int:
        """Store ``kept`` chunks for ``rows`` of ``table``; returns the rows that gained chunks (with regrowth)."""
        counts = table.store.row_counts()
        new = counts.clone()
        new[rows] = kept
        if torch.equal(new, counts):
            return 0
        if self.regrow:
            return int(table.resize_rows(new).numel())
        table.shrink_rows(new)
        return 0
