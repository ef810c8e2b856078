"""The next batch's ids on their way while this batch trains (TorchRec's pipelined input distribution).

The trainer calls :meth:`NextBatchIds.send` with the next micro-batch's model inputs right after this one's
forward: every sharded collection starts sending that batch's ids to their tables' owners
(:meth:`~.sharding.ShardedCollection.prefetch`) and the exchange runs during this batch's backward, optimizer step
and pruning. The next forward then only waits for ids that have arrived. Ids do not depend on the model, so the
result is the same as without prefetching (tested).

Which model input feeds which collection is found on the first forward: the positional arguments a collection
receives that *are* model inputs (the same objects; ``None`` stays ``None``). A collection fed anything the model
computed from its inputs, or called with keyword arguments, is not prefetched and exchanges its ids in its forward,
as before. A multi-hot batch's bag lengths go at once (they size the exchange of its ids); its ids, the bulk, are
what travels during the step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

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
        seen: dict[int, tuple | None] = {}      # positional arguments; None when called with keywords too

        def record(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                seen.setdefault(i, None if kwargs else tuple(args))
            return hook
        hooks = [c.register_forward_pre_hook(record(i), with_kwargs=True) for i, c in enumerate(self.collections)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        feeds: list[tuple[ShardedCollection, list[int | None]]] = []
        for i, collection in enumerate(self.collections):
            args = seen.get(i)
            if not args:         # not called, or called with keywords: left to exchange in its forward
                continue
            positions = [None if arg is None else next((p for p, x in enumerate(inputs) if x is arg), -1)
                         for arg in args]
            if -1 not in positions:
                feeds.append((collection, positions))
        # every rank must prefetch the same way: keep only what every rank found
        agreed = self.coll.all_gather_object([self.collections.index(c) for c, _ in feeds])
        self.feeds = [(c, p) for c, p in feeds if all(self.collections.index(c) in part for part in agreed)]

    @property
    def active(self) -> bool:
        """Whether anything may be prefetched (a distributed run with sharded collections, prefetching on)."""
        return bool(self.collections) and self.feeds != []

    def send(self, inputs: Sequence[Any], rows: int) -> None:
        """Start the id exchange of the micro-batch whose model inputs are ``inputs`` (``rows``: its global rows)."""
        sizes = self.coll.split_sizes(rows)
        for collection, positions in self.feeds or ():
            collection.prefetch(*(None if p is None else inputs[p] for p in positions), sizes=sizes)

    def drain(self) -> None:
        """Finish any exchange that no forward used (the end of training)."""
        for collection in self.collections:
            collection.drain()
