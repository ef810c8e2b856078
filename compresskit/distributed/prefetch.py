"""The next batch's ids on their way while this batch trains (TorchRec's pipelined input distribution).

The trainer calls :meth:`NextBatchIds.send` with the next micro-batch's model inputs right after this one's
forward: every sharded collection starts sending that batch's ids to their tables' owners
(:meth:`~.sharding.ShardedCollection.prefetch`) and the exchange runs during this batch's backward, optimizer step
and pruning. The next forward then only waits for ids that have arrived. Ids do not depend on the model, so the
result is the same as without prefetching (tested).

Which model input feeds which collection is found on the first forward: the arguments a collection receives that
*are* model inputs (the same objects; ``None`` stays ``None``). A collection fed anything the model computed from its
inputs is not prefetched and exchanges its ids in its forward, as before.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from torch import nn

from .collective import Collective
from .sharding import ShardedCollection


class NextBatchIds:
    """Prefetches each sharded collection's ids one micro-batch ahead (see the module docstring)."""

    def __init__(self, model: nn.Module, coll: Collective) -> None:
        self.coll = coll
        self.collections = [m for m in model.modules() if isinstance(m, ShardedCollection)] \
            if coll.distributed and coll.prefetch_ids else []
        self.feeds: list[tuple[ShardedCollection, list[int | None]]] | None = None if self.collections else []

    @contextlib.contextmanager
    def watch(self, inputs: Sequence[Any]) -> Iterator[None]:
        """Around the first forward: learn which model input each collection takes."""
        if self.feeds is not None:
            yield
            return
        seen: dict[int, tuple] = {}
        hooks = [c.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, tuple(args)))
                 for i, c in enumerate(self.collections)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        feeds: list[tuple[ShardedCollection, list[int | None]]] = []
        for i, collection in enumerate(self.collections):
            positions = [None if arg is None else next((p for p, x in enumerate(inputs) if x is arg), -1)
                         for arg in seen.get(i, (object(),))]
            if -1 not in positions:
                feeds.append((collection, positions))
        # every rank must prefetch the same way: keep only what every rank found
        agreed = self.coll.all_gather_object([self.collections.index(c) for c, _ in feeds])
        self.feeds = [(c, p) for c, p in feeds if all(self.collections.index(c) in part for part in agreed)]

    def send(self, inputs: Sequence[Any], rows: int) -> None:
        """Start the id exchange of the micro-batch whose model inputs are ``inputs`` (``rows``: its global rows)."""
        sizes = self.coll.split_sizes(rows)
        for collection, positions in self.feeds or ():
            collection.prefetch(*(None if p is None else inputs[p] for p in positions), sizes=sizes)

    def drain(self) -> None:
        """Finish any exchange that no forward used (the end of training)."""
        for collection in self.collections:
            collection.drain()
