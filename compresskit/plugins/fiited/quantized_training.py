"""Training a quantized chunk store: the fused optimizer step on INT8 / INT4 chunks and on FP32 cached rows.

Per touched row, its gradient is summed over the batch (utilities updated as for FP32 chunks), then:

* a row in the FP32 cache (the hottest rows) is updated in the cache, in full precision: the cache is its master
  copy, written back quantized only when the row is evicted;
* any other row is dequantized, updated, and quantized again, by default with stochastic rounding. There is no FP32
  master copy of these rows (it would cost the dense table's bytes), so an update smaller than half a quantization
  step would be rounded away every time with round-to-nearest: cold rows would stop learning. Stochastic rounding
  keeps each update in expectation.

The optimizer rules are the store's fused ones (``kernels.py``: SGD, Adagrad, row-wise Adagrad, FBGEMM's EXACT_*).
The native kernel (``backward_q`` in ``native/prefix_bag.cpp``) does all of it in one pass, seeding the stochastic
rounding per row; the torch path below is the fallback and the reference it is tested against.
"""
from __future__ import annotations

import torch

from . import kernels


def optimizer_step(values: torch.Tensor, grads: torch.Tensor, optimizer: str, lr: float, eps: float,
                   state: torch.Tensor | None, slots: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """Updated ``values [n, cs]`` of distinct chunks ``slots`` (rows ``row_of``) given their summed ``grads``; the
    Adagrad state (per slot, or per row for row-wise Adagrad) is updated in place."""
    if optimizer == "sgd":
        return values - lr * grads
    if optimizer == "adagrad":
        s = state[slots] + grads * grads
        state[slots] = s
        return values - lr * grads / (s.sqrt() + eps)
    if optimizer == "rowwise_adagrad":
        rows, inverse = torch.unique(row_of, return_inverse=True)
        sq = torch.zeros(rows.numel()).index_add_(0, inverse, (grads * grads).sum(1))
        n = torch.bincount(inverse, minlength=rows.numel()) * grads.shape[1]
        state[rows] += sq / n
        step = lr / (state[rows].sqrt() + eps)
        return values - step[inverse][:, None] * grads
    raise ValueError(f"a quantized store trains only with a fused optimizer (sgd, adagrad, rowwise_adagrad), "
                     f"got {optimizer!r}")


def quantized_backward(module, grad_out: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                       weights: torch.Tensor | None, state: torch.Tensor | None, utility: torch.Tensor | None,
                       gain: float) -> None:
    """The fused backward of a :class:`~.embedding.FiitedEmbeddingBag` whose store is quantized (see the module
    docstring): cached rows updated in FP32, the others re-quantized with the module's rounding."""
    store, cache = module.store, module.cache
    cs = store.chunk_size
    k = kernels.native_kernels()
    if k is not None:
        w = weights.contiguous().float() if weights is not None else torch.empty(0)
        seed = int(torch.randint(0, 2**62, (1,), generator=module._rounding_gen))
        k.backward_q(grad_out.contiguous().float(), store.codes, store.scales, store.bits, cs, store.counts,
                     store.base, ids, offsets, w, module.mode == "mean", module.num_embeddings,
                     kernels.OPTIMIZERS[module.optimizer], module.lr, module.eps,
                     state if state is not None else torch.empty(0),
                     utility if utility is not None else torch.empty(0), gain,
                     *kernels.native_cache(cache),
                     1 if module.rounding == "stochastic" else 0, seed)
        return
    layout = torch.empty(0, cs)   # the kernel reads the chunk size from it; the values live in codes / scales
    slots, grads = kernels.bag_backward(grad_out, layout, store.counts, store.base, ids, offsets, weights,
                                        module.mode == "mean", module.num_embeddings, "none", utility=utility,
                                        utility_gain=gain, sparse=True)
    if slots.numel() == 0:
        return
    rows = torch.unique(ids)       # the kernel emits chunks by ascending row, then chunk
    run, chunk, expected = kernels.expand_runs(*store.row_slots(rows))
    if not torch.equal(expected, slots):
        raise RuntimeError("quantized backward: the gradient's chunks do not match the rows' stored chunks")
    row_of = rows[run]
    hit, pos = cache.positions(row_of) if cache is not None else (torch.zeros_like(row_of, dtype=torch.bool), None)
    with torch.no_grad():
        if bool(hit.any()):
            at = torch.nonzero(hit).flatten()
            if bool((chunk[at] >= cache.starts[pos[at] + 1] - cache.starts[pos[at]]).any()):
                raise RuntimeError("the cache and the store disagree on a cached row's chunks")
            where = cache.chunk_index(pos[at], chunk[at])
            cache.values[where] = optimizer_step(cache.values[where], grads[at], module.optimizer, module.lr,
                                                 module.eps, state, slots[at], row_of[at])
        cold = torch.nonzero(~hit).flatten()
        if cold.numel():
            s = slots[cold]
            new = optimizer_step(store.read(s, row_of[cold]), grads[cold], module.optimizer, module.lr, module.eps,
                                 state, s, row_of[cold])
            store.write(s, new, module.rounding, module._rounding_gen, rows=row_of[cold])
