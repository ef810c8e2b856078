"""The ranks of a run and the collectives compresskit issues between them, each counted in bytes.

A :class:`Collective` of one process (``Collective.single()``) makes every operation the identity, so the same
training, pruning and evaluation code serves 1 and N processes. Counted bytes are what this rank hands to other
ranks: for ``all_to_all`` the blocks addressed to other ranks, for ``all_reduce`` the tensor (the payload; a ring
algorithm puts ``2 (N-1) / N`` of it on the wire), for ``all_gather`` the local block once per other rank.
"""
from __future__ import annotations

import pickle
from collections import Counter
from typing import Any, Sequence

import torch
import torch.distributed as dist


class Collective:
    """This process's rank among ``world`` ranks, and counted collectives over its process group(s).

    ``group`` carries dense traffic (gradients, reductions); ``table_group`` the embedding exchange, so that DDP's
    asynchronous all-reduces and the tables' all-to-alls never interleave on one group (TorchRec does the same);
    ``prefetch_group`` (default: ``table_group``) the ids of a coming batch sent ahead (:meth:`start_all_to_all`).
    """

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None, table_group: Any = None,
                 backend: str = "none", prefetch_group: Any = None) -> None:
        self.rank, self.world, self.group, self.table_group, self.backend = rank, world, group, table_group, backend
        self.prefetch_group = prefetch_group if prefetch_group is not None else table_group
        self.sent: Counter[str] = Counter()     # bytes handed to other ranks, by kind
        self.local_tables: set[str] | None = None   # names of the embedding tables this rank holds, when sharded
        self.table_order: list[str] = []            # every sharded table's name, in the unsharded model's order
        self.table_owners: list[int] = []           # owner rank of each of them
        self.table_lookups: list[int] = []          # features reading each of them (placement's work)
        self.prefetch_ids = True                    # the trainer sends the next batch's ids ahead (recipe option)
        self.replace_tables = False                 # the trainer may re-place tables (a run that can rebuild)

    @classmethod
    def single(cls) -> "Collective":
        """The collective of a one-process run: every operation is the identity."""
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes outputs and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ batch split
    def split_sizes(self, n: int) -> list[int]:
        """Rows of an ``n``-row global batch each rank takes (``torch.tensor_split``'s rule: the first ``n % world``
        ranks take one more), contiguous in rank order so the global batch order is kept."""
        base, extra = divmod(n, self.world)
        return [base + (1 if r < extra else 0) for r in range(self.world)]

    def local_range(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's rows of an ``n``-row global batch."""
        sizes = self.split_sizes(n)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    # ------------------------------------------------------------------------------------------ collectives
    def count(self, kind: str, nbytes: int) -> None:
        """Record ``nbytes`` this rank hands to other ranks in a collective of ``kind``."""
        self.sent[kind] += int(nbytes)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks in place (``sum`` or ``max``) and return it."""
        if self.distributed:
            self.count("all_reduce", tensor.numel() * tensor.element_size())
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return tensor

    def sum(self, value: float | int) -> float | int:
        """Sum a Python number over ranks (exact for integers below 2**53)."""
        if not self.distributed:
            return value
        is_int = isinstance(value, int)
        t = self.all_reduce(torch.tensor([value], dtype=torch.int64 if is_int else torch.float64))
        return int(t.item()) if is_int else float(t.item())

    def max(self, value: int) -> int:
        """The largest of an integer over ranks."""
        if not self.distributed:
            return value
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64), op="max").item())

    def all_gather_sizes(self, n: int) -> list[int]:
        """Every rank's ``n`` (e.g. local batch sizes), in rank order."""
        if not self.distributed:
            return [n]
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.count("all_gather", 8 * (self.world - 1))
        dist.all_gather(out, torch.tensor([n], dtype=torch.int64), group=self.table_group or self.group)
        return [int(t.item()) for t in out]

    def all_gather_rows(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``local`` rows (rank r holds ``sizes[r]`` rows), in rank order."""
        if not self.distributed:
            return local
        width = max(sizes)
        padded = local.new_zeros(width, *local.shape[1:])
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.count("all_gather", padded.numel() * padded.element_size() * (self.world - 1))
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` (small things: reports, errors), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        self.count("all_gather", len(pickle.dumps(obj)) * (self.world - 1))
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj`` on rank 0 (rank order); None on the other ranks."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        if not self.is_main:
            self.count("gather", len(pickle.dumps(obj)))
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_to_all(self, tensor: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
        """Send ``send[r]`` consecutive elements of the flat ``tensor`` to rank r; returns the concatenation of what
        every rank sent here (``recv[r]`` elements from rank r), on the table group."""
        return self.start_all_to_all(tensor, send, recv, asynchronous=False)[0]

    def start_all_to_all(self, tensor: torch.Tensor, send: Sequence[int], recv: Sequence[int],
                         asynchronous: bool) -> tuple[torch.Tensor, Any]:
        """:meth:`all_to_all` as ``(output, work)``: an ``asynchronous`` one runs on the prefetch group while the
        caller goes on, and its output is valid after ``work.wait()``; otherwise (and in a one-process run, where
        the output is ``tensor``) it is done and ``work`` is None."""
        if not self.distributed:
            return tensor, None
        out = tensor.new_empty(sum(recv))
        self.count("all_to_all", tensor.element_size() * (sum(send) - send[self.rank]))
        work = dist.all_to_all_single(out, tensor.contiguous(), list(recv), list(send),
                                      group=self.prefetch_group if asynchronous else self.table_group,
                                      async_op=asynchronous)
        return out, (work if asynchronous else None)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier(group=self.group)

    def table_index(self, name: str, fallback: int) -> int:
        """Position of table ``name`` in the unsharded model's table order (``fallback`` when not sharded)."""
        return self.table_order.index(name) if name in self.table_order else fallback

    def num_tables(self, local: int) -> int:
        """Tables over all ranks (``local`` when not sharded)."""
        return len(self.table_order) if self.table_order else local
