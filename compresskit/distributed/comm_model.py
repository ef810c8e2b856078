"""A model of the bytes one training step puts between ranks, to check against what :class:`Collective` counts.

Per rank r of N, a global batch of B rows (rank r holds B_r of them), F sharded features of widths d_f
(D = sum d_f; rank r owns features F_r of width D_r), 8-byte ids, 4-byte values:

* ``all_to_all``: ids out ``B_r * (F - |F_r|) * I`` (``I``: bytes a bag sends its owner: 8 for one id, plus 4
  for its weight; a multi-hot bag, padded or in a KeyedJaggedTensor, an 8-byte length plus the ids it holds, 8
  bytes each, and their 4-byte weights); pooled vectors out ``(B - B_r) * D_r * 4``; their gradients
  back ``B_r * (D - D_r) * 4``; once per micro-batch.
* ``all_gather``: the local batch size, 8 bytes to each other rank, once per micro-batch; none when the trainer
  sends each batch's ids ahead (``prefetched``: the sizes come from the batch split), but for each epoch's first.
* ``all_reduce``: the dense gradients (DDP, once per optimizer step: micro-batches before the last run under
  ``no_sync``) and the step's loss (8 bytes).

Pruning rounds add a few small reductions (the global threshold search) that this per-step model leaves out.
"""
from __future__ import annotations


def step_bytes(batch: int, world: int, rank: int, owners: list[int], dims: list[int], dense_grad_bytes: int,
               micro_batches: int = 1, id_bytes_per_bag: float = 8.0, prefetched: bool = False) -> dict[str, int]:
    """Bytes rank ``rank`` hands to other ranks in one optimizer step, by collective (see the module docstring)."""
    if world <= 1:
        return {"all_to_all": 0, "all_gather": 0, "all_reduce": 0}
    base, extra = divmod(batch, world)
    local = base + (1 if rank < extra else 0)
    mine = [f for f, o in enumerate(owners) if o == rank]
    width, total = sum(dims[f] for f in mine), sum(dims)
    a2a = round(local * (len(owners) - len(mine)) * id_bytes_per_bag) + (batch - local) * width * 4 \
        + local * (total - width) * 4
    gather = 8 * (world - 1) if owners and not prefetched else 0
    return {"all_to_all": micro_batches * a2a, "all_gather": micro_batches * gather,
            "all_reduce": dense_grad_bytes + 8}


def ring_wire_factor(world: int) -> float:
    """Bytes a ring all-reduce sends per byte of payload, per rank: ``2 (N - 1) / N``."""
    return 2 * (world - 1) / world if world > 1 else 0.0
