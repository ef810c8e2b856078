"""Lazy FIITED tables made from tables that were never allocated: a model bigger than memory starts.

The built-in ``dlrm``, when its recipe's ``fiited`` stage says ``lazy: true``, builds its tables on the ``meta``
device (shapes only). The stage then puts a lazy :class:`FiitedEmbeddingBag` in place of each: its pool holds only
the table's share of the budget, and a row gets its chunks (drawn from the table's own generator, at the table's
initial scale) the first time training touches it. No dense table exists at any point, on any rank.

Each table's pool is an equal share of what the budget leaves after every table's index, and a table smaller than
its share is held whole (its share going to the others). Equal, not in proportion to size: every feature is looked
up once a sample whatever its table's size, so a small table's rows are the busy ones, and the pruning threshold of
a non-lazy run keeps them whole too.
"""
from __future__ import annotations

from torch import nn

from .embedding import FiitedEmbeddingBag
from .row_index import index_bytes


def lazy_capacities(shapes: list[tuple[int, int]], chunk_size: int, budget_bytes: float, chunk_bytes: int
                    ) -> list[int]:
    """Pool capacity in chunks of each table of ``shapes`` (rows, dim): the budget less every table's index, in
    equal shares, a table smaller than its share held whole (see the module docstring). ValueError when the index
    leaves no room."""
    full = [rows * (dim // chunk_size) for rows, dim in shapes]
    room = (budget_bytes - sum(index_bytes(rows) for rows, _ in shapes)) // chunk_bytes
    if room < 1:
        raise ValueError(f"a budget of {int(budget_bytes)} bytes leaves no room for chunks after the tables' index "
                         f"({sum(index_bytes(rows) for rows, _ in shapes)} bytes)")
    capacity = [0] * len(full)
    open_ = [t for t in range(len(full)) if full[t]]
    while open_:       # water-filling: equal shares; a table smaller than its share is held whole, the rest re-share
        share = room / len(open_)
        small = [t for t in open_ if full[t] <= share]
        if not small:
            for t in open_:
                capacity[t] = max(int(share), 1)
            break
        for t in small:
            capacity[t] = full[t]
            room -= full[t]
        open_ = [t for t in open_ if full[t] > share]
    return capacity

def make_lazy(model: nn.Module, tables: list[tuple[str, nn.Module]], capacities: list[int], seeds: list[int],
              chunk_size: int, **kwargs) -> None:
    """Put a lazy :class:`FiitedEmbeddingBag` of the given capacity in place of each ``(name, nn.EmbeddingBag)``
    (on the meta device: never allocated); its fresh rows start at the table's ``init_std`` (the model's own
    initial scale when it sets one, else ``nn.EmbeddingBag``'s, 1.0) from a generator seeded with ``seeds``."""
    for (name, table), capacity, seed in zip(tables, capacities, seeds):
        if not isinstance(table, nn.EmbeddingBag):
            raise ValueError(f"{name} is a {type(table).__name__}; lazy tables replace nn.EmbeddingBag tables only")
        model.set_submodule(name, FiitedEmbeddingBag(
            table.num_embeddings, table.embedding_dim, chunk_size, mode=table.mode,
            include_last_offset=table.include_last_offset, lazy=True, capacity=capacity, sparse=table.sparse,
            init_std=float(getattr(table, "init_std", 1.0)), seed=seed, **kwargs))
