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
from .jagged import offsets_for, send_bags
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
        self.weighted = bool(collection.is_weighted())
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

    def forward(self, features):
        """``KeyedJaggedTensor`` of this rank's samples -> ``KeyedTensor`` of every feature's pooled vectors."""
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
                pooled.append(bag(input=ids[j], offsets=offsets_for(bag_lengths[j], bag),
                                  per_sample_weights=None if w is None else w[j]).float())
        local = torch.cat(pooled, dim=1) if pooled else torch.zeros(sum(sizes), 0)
        out = self._return_pooled(local, batch, sizes)
        return KeyedTensor(keys=self.keys_out, length_per_key=self.feature_dims, values=torch.cat(out, dim=1))

    def _send_ids(self, inputs: tuple, sizes: list[int], asynchronous: bool) -> Callable[[], Any]:
        features, = inputs
        batch, keys = features.stride(), features.keys()
        missing = [k for inputs_ in self.inputs_of for k in inputs_ if k not in keys]
        if missing:
            raise ValueError(f"the KeyedJaggedTensor has no feature '{missing[0]}' (it has {', '.join(keys)})")
        where = {k: i for i, k in enumerate(keys)}
        per_key = features.length_per_key()
        weights = features.weights_or_none()
        weights = weights.split(per_key) if self.weighted and weights is not None else None
        ids_per_bag = sum(per_key) / max(batch * len(keys), 1)
        self.id_bytes_per_bag = 8 + ids_per_bag * (8 + (4 if weights is not None else 0))  # a length, ids, weights
        return send_bags(self.coll, list(features.lengths().view(len(keys), batch)),
                         features.values().split(per_key), weights,
                         [[where[k] for k in inputs_] for inputs_ in self.inputs_of], sizes, asynchronous)

    def extra_repr(self) -> str:
        mine = [n for n, o in zip(self.table_names, self.owners) if o == self.coll.rank]
        return f"rank {self.coll.rank} of {self.coll.world}: tables {mine}"

