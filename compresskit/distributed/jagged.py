"""Jagged bags sent to their tables' owners: a length per bag, then the ids (and per-id weights) back to back.

This is how a TorchRec KeyedJaggedTensor travels (:mod:`.bag_collection`), and how compresskit's padded multi-hot
bags travel too (:class:`~.sharding.ShardedTables`): a bag costs its length and what it holds, never its padding.
Two ``all_to_all`` s: the lengths first (they size the second), then the ids and weights, which an asynchronous
send leaves running (:meth:`~.sharding.ShardedCollection.prefetch`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .collective import Collective

Received = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]


def send_bags(coll: Collective, lengths: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
              weights: Sequence[torch.Tensor] | None, inputs_of: list[list[int]], sizes: list[int],
              asynchronous: bool) -> Callable[[], Received]:
    """Send each input's bags (``lengths[i]``: this rank's ``[batch]`` bag lengths of input ``i``, ``values[i]`` and
    ``weights[i]`` its ids and weights back to back) to every rank that pools it (``inputs_of[r]``: the inputs rank
    ``r`` pools, in its order; ``sizes``: every rank's batch). Returns the function that gives, for each input this
    rank pools, its bag lengths, ids and weights over the global batch, samples in rank order."""
    mine, batch = inputs_of[coll.rank], sizes[coll.rank]
    order = [i for inputs in inputs_of for i in inputs]
    got = coll.all_to_all(torch.cat([lengths[i].long() for i in order]) if order else torch.zeros(0, dtype=torch.long),
                          [batch * len(inputs) for inputs in inputs_of], [n * len(mine) for n in sizes])
    got_lengths = [part.view(len(mine), n) for part, n in zip(got.split([n * len(mine) for n in sizes]), sizes)]
    held = [int(values[i].numel()) for i in range(len(values))]
    send = [sum(held[i] for i in inputs) for inputs in inputs_of]
    recv = [int(part.sum()) for part in got_lengths]

    def exchange(parts: Sequence[torch.Tensor], dtype: torch.dtype):
        flat = torch.cat([parts[i] for i in order]) if order else torch.zeros(0, dtype=dtype)
        return coll.start_all_to_all(flat, send, recv, asynchronous=asynchronous)

    ids, ids_work = exchange([v.long() for v in values], torch.long)
    w, w_work = (None, None) if weights is None else exchange([x.detach().float() for x in weights], torch.float)

    def received() -> Received:
        for work in (ids_work, w_work):
            if work is not None:
                work.wait()
        bag_lengths = [torch.cat([part[j] for part in got_lengths]) for j in range(len(mine))]
        return bag_lengths, _by_input(ids, got_lengths), None if w is None else _by_input(w, got_lengths)
    return received


def _by_input(received: torch.Tensor, got_lengths: list[torch.Tensor]) -> list[torch.Tensor]:
    """What every rank sent here (its samples' values of this rank's inputs, input by input) regrouped: one tensor
    per input, samples in rank order."""
    counts = [part.sum(1).tolist() for part in got_lengths]           # [source rank][input]
    pieces = received.split([c for per_rank in counts for c in per_rank])
    inputs = len(counts[0]) if counts else 0
    return [torch.cat([pieces[s * inputs + j] for s in range(len(counts))]) for j in range(inputs)]


def offsets_for(lengths: torch.Tensor, bag: nn.Module) -> torch.Tensor:
    """Bag offsets of ``lengths`` in the form ``bag`` takes (with the final end when it says
    ``include_last_offset``, as TorchRec's bags do)."""
    ends = torch.cumsum(lengths, 0)
    if getattr(bag, "include_last_offset", False):
        return torch.cat([ends.new_zeros(1), ends])
    return ends - lengths
