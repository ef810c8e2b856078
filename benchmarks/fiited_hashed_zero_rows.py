"""FIITED + hashing, the experiment: rows pruned to zero chunks read a small shared hashed pool instead of zeros.

Each FIITED table gets a pool of ``max(1, share * target_memory_ratio * rows)`` FP32 rows (zeros at first, trained
by the run's optimizer); a row that keeps no chunk reads ``pool[hash(id)]``, a row that keeps any reads its chunks
as before. The pool's bytes come out of the chunk budget, so every cell is at the same total bytes as plain FIITED
in ``fiited_quality.json`` (the same recipe, seeds and optimizer). The method is registered through
``TABLE_METHODS`` like any user's method; it is not built in, because it did not win (docs/fiited.md).

    python benchmarks/fiited_hashed_zero_rows.py [--datasets movielens] [--ratios 0.02 0.01] [--shares 0.2 0.05]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fiited_quality as fq  # noqa: E402
from common import RESULTS, publish  # noqa: E402

from compresskit.plugins.fiited.methods import TABLE_METHODS  # noqa: E402
from compresskit.plugins.fiited.methods.fiited import ChunkPruning  # noqa: E402

OPTIMIZER = {"movielens": "adagrad", "adult": "adam"}   # fiited_quality.json's choice (dense validation AUC)


class HashedZeroRows(ChunkPruning):
    """FIITED whose zero-chunk rows read a shared hashed pool (``share`` of each table's budget)."""

    name = "fiited_hashed_zero_rows"
    share = 0.2
    pool_bytes = 0

    def track(self, table: nn.Module) -> None:
        super().track(table)
        rows = max(1, int(self.share * self.config.target_memory_ratio * table.num_embeddings))
        table.zero_row_pool = nn.Parameter(torch.zeros(rows, table.embedding_dim))
        HashedZeroRows.pool_bytes += rows * table.embedding_dim * 4
        chunk_forward = table.forward

        def forward(input, offsets=None, per_sample_weights=None):
            out = chunk_forward(input, offsets, per_sample_weights)
            ids = input.reshape(-1)
            if input.dim() == 2:
                offsets = torch.arange(0, ids.numel(), input.shape[1])
            zero = (table.store.counts[ids] == 0).float()
            w = zero if per_sample_weights is None else zero * per_sample_weights.reshape(-1)
            slot = (ids * 2654435761 + 12345) % table.zero_row_pool.shape[0]
            return out + F.embedding_bag(slot, table.zero_row_pool, offsets, mode="sum", per_sample_weights=w)

        table.forward = forward

    def prune(self, target: int, tables) -> int | None:
        chunk_bytes = tables.modules[0][1].chunk_size * 4
        return super().prune(max(0, target - HashedZeroRows.pool_bytes // chunk_bytes), tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["movielens"], choices=list(OPTIMIZER))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.02, 0.01])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.2, 0.05])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    TABLE_METHODS.add(HashedZeroRows.name, HashedZeroRows)
    with open(Path(RESULTS) / "fiited_quality.json", encoding="utf-8") as f:
        plain = {(c["dataset"], c["ratio"]): c for c in json.load(f)["cells"] if c["method"] == "fiited"}
    cells, rows = [], []
    for ds in args.datasets:
        for ratio in args.ratios:
            for share in args.shares:
                HashedZeroRows.share = share
                aucs, pools = [], []
                for seed in range(args.seeds):
                    HashedZeroRows.pool_bytes = 0
                    cell = fq.run_cell(fq.DATASETS[ds], HashedZeroRows.name, ratio, seed, OPTIMIZER[ds])
                    if "error" in cell:
                        break
                    aucs.append(cell["auc"])
                    pools.append(HashedZeroRows.pool_bytes)
                base = plain.get((ds, ratio), {}).get("auc")
                row = {"dataset": ds, "ratio": ratio, "share": share, "auc": statistics.mean(aucs) if aucs else None,
                       "auc_per_seed": aucs, "pool_bytes": pools[0] if pools else None, "fiited_auc": base}
                cells.append(row)
                rows.append([ds, ratio, share, row["pool_bytes"], row["auc"], base,
                             row["auc"] - base if aucs and base else None])
    publish("fiited_hashed_zero_rows", ["dataset", "budget", "pool share", "pool bytes", "mean test AUC",
                                        "FIITED AUC", "vs FIITED"], rows, {"cells": cells})


if __name__ == "__main__":
    main()
