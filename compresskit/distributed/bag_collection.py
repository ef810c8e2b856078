"""Table-wise sharding of a TorchRec ``EmbeddingBagCollection``: multi-hot bags travel as a KeyedJaggedTensor does.

A forward sends each feature's bags to the owner of its table in two ``all_to_all`` s: first every bag's length,
then the ids (and their per-id weights) back to back, so variable-length bags cost what they hold, never padding.
The owner pools the whole global batch of its features with its own bag modules (``nn.EmbeddingBag`` or what a
stage put in their place), and the pooled vectors go back as for :class:`~.sharding.ShardedTables`. The result is
the ``KeyedTensor`` the unsharded collection returns, for this rank's samples.

TorchRec is only touched when a model holds an ``EmbeddingBagCollection``; nothing here imports it otherwise.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from .collective import Collective
from .sharding import ShardedCollection


def is_bag_collection(module: nn.Module) -> bool:
    """Whether ``module`` is a TorchRec ``EmbeddingBagCollection`` (checked only once TorchRec is imported)."""
    modules = sys.modules.get("torchrec.modules.embedding_modules")
    return modules is not None and isinstance(module, modules.EmbeddingBagCollection)


def bag_collection_tables(collection: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name under the collection, bag, features reading it)`` of every table, in the collection's order."""
    return [(f"embedding_bags.{name}", bag, len(config.feature_names))
            for (name, bag), config in zip(collection.embedding_bags.items(), collection.embedding_bag_configs())]


class ShardedBagCollection(nn.Module, ShardedCollection):
    """This rank's tables of a sharded ``EmbeddingBagCollection`` (state-dict keys stay the collection's:
    ``embedding_bags.<table>.*``); ``forward(kjt) -> KeyedTensor`` of every feature for this rank's samples.

    Per-id weights (``is_weighted``) travel with the ids as data: the sharded lookup gives them no gradient."""

    def __init__(self, collection: nn.Module, owners: list[int], coll: Collective) -> None:
        super().__init__()
        names = list(collection.embedding_bags.keys())
        self.embedding_bags = nn.ModuleDict({n: collection.embedding_bags[n] for n, o in zip(names, owners)
                                             if o == coll.rank})
        self.is_weighted = bool(collection.is_weighted())
        self.table_names = names
        self.table_features = [list(c.feature_names) for c in collection.embedding_bag_configs()]
        self.dims = [int(c.embedding_dim) for c in collection.embedding_bag_configs()]
        self.keys_out = list(collection._embedding_names)
        table_of_output = [t for t, feats in enumerate(self.table_features) for _ in feats]
        self._init_outputs(coll, owners, [owners[t] for t in table_of_output],
                           [self.dims[t] for t in table_of_output])
        # the input features each rank pools (a feature read by tables on two ranks goes to both)
        self.inputs_of = [list(dict.fromkeys(f for t, o in enumerate(owners) if o == r for f in self.table_features[t]))
                          for r in range(coll.world)]

    def forward(self, features):  # KeyedJaggedTensor -> KeyedTensor
        from torchrec.sparse.jagged_tensor import KeyedTensor

        coll, mine = self.coll, self.inputs_of[self.coll.rank]
        batch = features.stride()
        sizes, (bag_lengths, ids, w) = self._received_ids((features,), batch)
        pooled = []
        for t, name in enumerate(self.table_names):
            if self.owners[t] != coll.rank:
                continue
            bag = self.embedding_bags[name]
            for feature in self.table_features[t]:
                j = mine.index(feature)
                pooled.append(bag(input=ids[j], offsets=_offsets(bag_lengths[j], bag),
                                  per_sample_weights=None if w is None else w[j]).float())
        local = torch.cat(pooled, dim=1) if pooled else torch.zeros(sum(sizes), 0)
        out = self._return_pooled(local, batch, sizes)
        return KeyedTensor(keys=self.keys_out, length_per_key=self.feature_dims, values=torch.cat(out, dim=1))

    def _send_ids(self, inputs: tuple, sizes: list[int], asynchronous: bool) -> Callable[[], Any]:
        """Bag lengths first (waited for: they size the second exchange), then the ids and weights, which an
        ``asynchronous`` send leaves running."""
        features, = inputs
        coll, mine = self.coll, self.inputs_of[self.coll.rank]
        batch, keys = features.stride(), features.keys()
        missing = [k for inputs_ in self.inputs_of for k in inputs_ if k not in keys]
        if missing:
            raise ValueError(f"the KeyedJaggedTensor has no feature '{missing[0]}' (it has {', '.join(keys)})")
        where = {k: i for i, k in enumerate(keys)}
        lengths = features.lengths().long().view(len(keys), batch)
        per_key = features.length_per_key()
        values = features.values().long().split(per_key)
        weights = features.weights_or_none()
        weights = weights.detach().split(per_key) if self.is_weighted and weights is not None else None
        order = [where[k] for inputs_ in self.inputs_of for k in inputs_]

        # 1. bag lengths: rank r gets [its inputs, every rank's samples]
        got = coll.all_to_all(torch.cat([lengths[i] for i in order]),
                              [batch * len(inputs_) for inputs_ in self.inputs_of], [n * len(mine) for n in sizes])
        got_lengths = [part.view(len(mine), n) for part, n in zip(got.split([n * len(mine) for n in sizes]), sizes)]
        # 2. the ids (and weights), feature by feature within each rank's block
        send = [sum(per_key[where[k]] for k in inputs_) for inputs_ in self.inputs_of]
        recv = [int(part.sum()) for part in got_lengths]
        exchange = coll.all_to_all_async if asynchronous else (lambda *a: (coll.all_to_all(*a), None))
        ids, ids_work = exchange(torch.cat([values[i] for i in order]), send, recv)
        w, w_work = (None, None) if weights is None else exchange(torch.cat([weights[i] for i in order]), send, recv)
        ids_per_bag = sum(per_key) / max(batch * len(keys), 1)
        self.id_bytes_per_bag = 8 + ids_per_bag * (8 + (4 if weights is not None else 0))  # a length, ids, weights

        def received() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
            for work in (ids_work, w_work):
                if work is not None:
                    work.wait()
            bag_lengths = [torch.cat([part[j] for part in got_lengths]) for j in range(len(mine))]
            return (bag_lengths, self._by_feature(ids, got_lengths),
                    None if w is None else self._by_feature(w, got_lengths))
        return received

    def _by_feature(self, received: torch.Tensor, got_lengths: list[torch.Tensor]) -> list[torch.Tensor]:
        """What each rank sent here (its samples' values of this rank's inputs, input by input) regrouped: one
        tensor per input feature, samples in rank order."""
        counts = [part.sum(1).tolist() for part in got_lengths]           # [source rank][input]
        pieces = received.split([c for per_rank in counts for c in per_rank])
        inputs = len(counts[0]) if counts else 0
        return [torch.cat([pieces[s * inputs + j] for s in range(len(counts))]) for j in range(inputs)]

    def extra_repr(self) -> str:
        mine = [n for n, o in zip(self.table_names, self.owners) if o == self.coll.rank]
        return f"rank {self.coll.rank} of {self.coll.world}: tables {mine}"


def _offsets(lengths: torch.Tensor, bag: nn.Module) -> torch.Tensor:
    """Bag offsets of ``lengths`` in the form ``bag`` takes (with the final end when it says
    ``include_last_offset``, as TorchRec's bags do)."""
    ends = torch.cumsum(lengths, 0)
    if getattr(bag, "include_last_offset", False):
        return torch.cat([ends.new_zeros(1), ends])
    return ends - lengths
