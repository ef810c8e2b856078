"""Table-wise sharding of embedding tables over ranks (the DLRM / TorchRec layout) and data parallelism (DDP) for
everything else.

* :func:`~.placement.place_tables` gives every table one owner, balancing bytes and lookups together.
* :class:`ShardedTables` replaces an :class:`~compresskit.models.tables.EmbeddingTables` collection (a TorchRec
  ``EmbeddingBagCollection`` gets :class:`~.bag_collection.ShardedBagCollection`, which sends bags as a KJT does).
  A forward sends each feature's ids to the table's owner (``all_to_all``), the owner looks up the whole global
  batch, and a second ``all_to_all`` returns each rank the pooled vectors of its own samples. Backward runs the second exchange
  in reverse, dividing the gradients by the number of ranks: every rank's loss is a mean over its share of the
  batch, and DDP averages the dense gradients the same way.
* :func:`data_parallel` wraps the model in ``DistributedDataParallel`` with the sharded tables' parameters and
  buffers ignored, so DDP never hooks a table (FIITED replaces its pools when it prunes) and never all-reduces one.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..metrics import module_bytes
from ..models.tables import EmbeddingTables, check_sparse, feature_bags, feature_major_bags
from .collective import Collective
from .jagged import offsets_for, send_bags
from .placement import place_tables


class _Exchange(torch.autograd.Function):
    """``all_to_all`` whose backward sends the gradients back the same way, scaled by ``grad_scale``."""

    @staticmethod
    def forward(ctx, values, anchor, coll, send, recv, grad_scale):
        ctx.coll, ctx.send, ctx.recv, ctx.grad_scale = coll, send, recv, grad_scale
        return coll.all_to_all(values, send, recv)

    @staticmethod
    def backward(ctx, grad):
        back = ctx.coll.all_to_all(grad.contiguous(), ctx.recv, ctx.send)
        return back * ctx.grad_scale, None, None, None, None, None


class ShardedCollection:
    """What every table-wise sharded collection shares: the owner and width of each table and of each output
    (a pooled feature), and the exchange that returns each rank the pooled vectors of its own samples.

    Subclasses are ``nn.Module`` s that call :meth:`_init_outputs` in their constructor."""

    coll: Collective
    owners: list[int]            # owner rank of every table, in the unsharded collection's order
    feature_owners: list[int]    # owner rank of every output (a pooled feature), in output order
    feature_dims: list[int]      # width of every output
    id_bytes_per_bag: float = 8.0   # bytes one bag sent to its owner in the last batch (the communication model)
    prefetched_batches: int = 0     # forwards whose ids were sent ahead (no batch-size all-gather)

    def _init_outputs(self, coll: Collective, owners: list[int], feature_owners: list[int],
                      feature_dims: list[int]) -> None:
        self.coll, self.owners = coll, list(owners)
        self.feature_owners, self.feature_dims = list(feature_owners), list(feature_dims)
        self.outputs_of = [[k for k, o in enumerate(feature_owners) if o == r] for r in range(coll.world)]
        self.widths = [sum(feature_dims[k] for k in outs) for outs in self.outputs_of]   # pooled width a rank
        self._anchor = torch.zeros(0, requires_grad=True)  # makes every rank run the backward exchange
        self._pending: tuple | None = None     # a prefetch: (its inputs, every rank's rows, what waits for it)

    def _send_ids(self, inputs: tuple, sizes: list[int], asynchronous: bool) -> Callable[[], Any]:
        """Send a batch's ids (``inputs``: what ``forward`` takes) to their tables' owners; returns the function that
        waits for and returns what this rank received (the ``asynchronous`` exchange runs while the caller goes
        on)."""
        raise NotImplementedError

    def prefetch(self, *inputs: Any, sizes: list[int]) -> None:
        """Start sending a coming batch's ids to their owners without waiting (TorchRec's pipelined input
        distribution): a later ``forward`` on the same input objects only waits for them. ``sizes``: every rank's
        rows of that batch (:meth:`Collective.split_sizes`). Every rank must prefetch the same batches."""
        self.drain()
        self._pending = (inputs, sizes, self._send_ids(inputs, sizes, asynchronous=True))

    def drain(self) -> None:
        """Finish and drop a prefetch that no forward used (every rank started it, so every rank waits for it)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[2]()

    def _received_ids(self, inputs: tuple, batch: int) -> tuple[list[int], Any]:
        """(every rank's rows, what this rank received) for a forward on ``inputs``: the prefetched exchange when
        it was started on these very objects, else one exchanged now."""
        pending, self._pending = self._pending, None
        if pending is not None and len(pending[0]) == len(inputs) and all(a is b for a, b in zip(pending[0], inputs)) \
                and pending[1][self.coll.rank] == batch:
            self.prefetched_batches += 1
            return pending[1], pending[2]()
        if pending is not None:
            pending[2]()
        sizes = self.coll.all_gather_sizes(batch)
        return sizes, self._send_ids(inputs, sizes, asynchronous=False)()

    def _return_pooled(self, pooled: torch.Tensor, batch: int, sizes: list[int]) -> list[torch.Tensor]:
        """This rank's pooled outputs ``[global batch, its width]`` (samples in rank order) sent back to the ranks
        whose samples they are; returns every output's ``[batch, dim]`` for this rank's own samples."""
        coll, widths = self.coll, self.widths
        anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
        mine_out = _Exchange.apply(pooled.reshape(-1), anchor, coll, [n * widths[coll.rank] for n in sizes],
                                   [batch * w for w in widths], 1.0 / coll.world)
        out: list[torch.Tensor | None] = [None] * len(self.feature_owners)
        for block, outs, w in zip(mine_out.split([batch * w for w in widths]), self.outputs_of, widths):
            for k, vec in zip(outs, block.view(batch, w).split([self.feature_dims[k] for k in outs], dim=1)):
                out[k] = vec
        return out  # type: ignore[return-value]


class ShardedTables(nn.ModuleDict, ShardedCollection):
    """This rank's tables of a sharded :class:`EmbeddingTables`, keyed by feature index (state-dict keys stay those
    of the unsharded collection); ``forward(sparse [B_local, F] or [B_local, F, L], weights=None) -> [B_local,
    dim_f]`` per feature, exchanged (multi-hot bags travel jagged, without their padding: :mod:`.jagged`)."""

    def __init__(self, tables: EmbeddingTables, owners: list[int], coll: Collective) -> None:
        super().__init__({str(i): t for i, t in enumerate(tables) if owners[i] == coll.rank})
        self.dims = tables.dims()
        self._init_outputs(coll, owners, owners, self.dims)
        self.features_of = self.outputs_of   # one output (feature) a table

    def forward(self, sparse: torch.Tensor, weights: torch.Tensor | None = None  # type: ignore[override]
                ) -> list[torch.Tensor]:
        mine = self.features_of[self.coll.rank]
        check_sparse(sparse, weights, len(self.owners))
        batch = sparse.shape[0]
        sizes, received = self._received_ids((sparse, weights), batch)
        if sparse.dim() == 3:       # jagged: (bag lengths, ids, weights) of each of this rank's features
            lengths, ids, w = received
            bags = [(ids[j], offsets_for(lengths[j], self[str(f)])) + (() if w is None else (w[j],))
                    for j, f in enumerate(mine)]
        else:
            bags = feature_bags(*received)
        pooled = (torch.cat([self[str(f)](*bag) for f, bag in zip(mine, bags)], dim=1) if mine
                  else torch.zeros(sum(sizes), 0))
        return self._return_pooled(pooled, batch, sizes)

    def prefetch(self, sparse: torch.Tensor, weights: torch.Tensor | None = None,  # type: ignore[override]
                 *, sizes: list[int]) -> None:
        """:meth:`ShardedCollection.prefetch` of the ids (and weights) ``forward`` will take."""
        check_sparse(sparse, weights, len(self.owners))
        super().prefetch(sparse, weights, sizes=sizes)

    def _send_ids(self, inputs: tuple, sizes: list[int], asynchronous: bool) -> Callable[[], Any]:
        sparse, weights = inputs
        batch, features = sparse.shape[0], sparse.shape[1]
        if sparse.dim() == 3:       # multi-hot bags padded with -1: sent as jagged bags
            ids, lengths, w = feature_major_bags(sparse.long(), weights)
            lengths = lengths.view(features, batch)
            per_feature = lengths.sum(1).tolist()
            self.id_bytes_per_bag = 8 + ids.numel() / max(batch * features, 1) * (8 + (4 if w is not None else 0))
            return send_bags(self.coll, list(lengths), ids.split(per_feature),
                             None if w is None else w.split(per_feature), self.features_of, sizes, asynchronous)
        self.id_bytes_per_bag = 8 + (4 if weights is not None else 0)   # one id (and weight) a bag
        ids = self._to_owners(sparse.long(), batch, sizes, asynchronous)
        w = None if weights is None else self._to_owners(weights, batch, sizes, asynchronous)
        return lambda: (ids(), None if w is None else w())

    def _to_owners(self, values: torch.Tensor, batch: int, sizes: list[int], asynchronous: bool
                   ) -> Callable[[], torch.Tensor]:
        """Each feature's ids (or weights) ``[batch, F]`` sent to the feature's owner; returns the function that
        gives what this rank got, ``[global batch, its features]`` with samples in rank order."""
        mine = self.features_of[self.coll.rank]
        args = (torch.cat([values[:, f].reshape(-1) for f in self.features_of]),
                [batch * len(f) for f in self.features_of], [n * len(mine) for n in sizes])
        out, work = self.coll.start_all_to_all(*args, asynchronous=asynchronous)

        def received() -> torch.Tensor:
            if work is not None:
                work.wait()
            return torch.cat([part.view(n, len(mine)) for part, n in zip(out.split([n * len(mine) for n in sizes]),
                                                                          sizes)])
        return received

    def extra_repr(self) -> str:
        return f"rank {self.coll.rank} of {self.coll.world}: features {self.features_of[self.coll.rank]}"


def _collections(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module, int]], Callable]]:
    """Every table collection in ``model``: ``(module name, [(table name, table, features reading it)],
    make_sharded(owners, coll))``, ``EmbeddingTables`` (DLRM's) and TorchRec ``EmbeddingBagCollection`` s."""
    from .bag_collection import ShardedBagCollection, bag_collection_tables, is_bag_collection

    found: list[tuple[str, list[tuple[str, nn.Module, int]], Callable]] = []
    for name, m in model.named_modules():
        if isinstance(m, EmbeddingTables):
            tables = [(str(i), t, 1) for i, t in enumerate(m)]
            found.append((name, tables, lambda owners, coll, m=m: ShardedTables(m, owners, coll)))
        elif is_bag_collection(m):
            found.append((name, bag_collection_tables(m),
                          lambda owners, coll, m=m: ShardedBagCollection(m, owners, coll)))
    return found


def shard_tables(model: nn.Module, coll: Collective, owners: list[int] | None = None, unbuilt: bool = False
                 ) -> list[str]:
    """Replace every table collection in ``model`` (:class:`EmbeddingTables`, TorchRec ``EmbeddingBagCollection``)
    by this rank's sharded one (one placement over all collections, bytes and lookups balanced); the tables other
    ranks own are dropped; ``owners`` (one rank a table, in table order) replaces the computed placement, as a
    re-placement or a resume records it; ``unbuilt``: this rank's tables may be on the meta device (a lazy stage
    makes them). Returns the local table names and records them, the global table order, the owners and the
    lookups on ``coll``."""
    collections = _collections(model)
    coll.table_order, coll.table_owners, coll.table_lookups, coll.local_tables = [], [], [], None
    if not collections:
        return []
    if any(not prefix for prefix, _, _ in collections):
        raise ValueError("the model itself is a table collection; wrap it in a module to shard it")
    named = [(f"{prefix}.{name}", table, reads) for prefix, tables, _ in collections for name, table, reads in tables]
    names = [name for name, _, _ in named]
    lookups = [reads for _, _, reads in named]
    if owners is None:
        owners = place_tables([module_bytes(t)["total"] for _, t, _ in named], coll.world, lookups)
    elif len(owners) != len(named) or not all(0 <= o < coll.world for o in owners):
        raise ValueError(f"the recorded placement ({len(owners)} tables over ranks {sorted(set(owners))}) does not "
                         f"fit this model's {len(named)} tables on {coll.world} ranks")
    for (name, table, _), owner in zip(named, owners):
        if owner == coll.rank and not unbuilt and any(p.is_meta for p in table.parameters()):
            raise ValueError(f"table '{name}' is placed on rank {coll.rank}, which did not build it (the model "
                             f"built its tables for another placement)")
    start = 0
    for prefix, tables, make_sharded in collections:
        model.set_submodule(prefix, make_sharded(owners[start:start + len(tables)], coll))
        start += len(tables)
    coll.table_order, coll.table_owners, coll.table_lookups = names, list(owners), lookups
    coll.local_tables = {n for n, o in zip(names, owners) if o == coll.rank}
    return sorted(coll.local_tables, key=names.index)


def sharded_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers under sharded collections (what DDP must leave alone)."""
    out = []
    for prefix, m in model.named_modules():
        if isinstance(m, ShardedCollection):
            out += [f"{prefix}.{n}" for n, _ in m.named_parameters()]
            out += [f"{prefix}.{n}" for n, _ in m.named_buffers()]
    return out


def data_parallel(model: nn.Module, coll: Collective) -> nn.Module:
    """``DistributedDataParallel`` over ``model``'s dense part (sharded tables ignored), with its gradient
    all-reduces counted on ``coll``; the model itself when nothing is left to synchronise."""
    ignored = set(sharded_names(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n not in ignored]
    if not coll.distributed or not trainable:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    ddp = DistributedDataParallel(model, process_group=coll.group)

    def counted_allreduce(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        buffer = bucket.buffer()
        coll.count("all_reduce", buffer.numel() * buffer.element_size())
        return default_hooks.allreduce_hook(coll.group, bucket)

    ddp.register_comm_hook(None, counted_allreduce)
    return ddp
