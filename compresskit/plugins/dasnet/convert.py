"""``to_sparse_execution``: switch a WTA model to the compact inference path, fold BatchNorms, keep it where faster.

The model's ``WTADropout`` modules are set to return ``ChannelSparse`` and every layer that receives one is
wrapped in its sparse twin (``sparse_exec``), repeating until nothing new is found (a wrapped pool passes the
compact form on to the layer behind it). BatchNorms (and ReLUs) right after a wrapped conv are folded into it
(``fuse``). Whether all that beats the masked dense model depends on the net, the batch size and the CPU, so each
batch size in ``batch_sizes`` is timed both ways and the compact path kept only where it is faster; where no batch
size gains, the model is left exactly as it was (``tune=False``: kept for every size without timing). Where the
compact path is kept, it is timed once more with the convolution kernels prepacked for oneDNN
(``onednn.prepack_conv_weight``), kept where that is faster still; where ``onednn`` cannot prepack (private
operators missing or switched off), that step is skipped. Timings are medians of a few single calls, each after
warm-up calls, taken with ``torch.utils.benchmark.Timer`` at the process's thread count.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import benchmark

from . import onednn
from .compact import ChannelSparse
from .fuse import fold_batchnorm, unfold_batchnorm
from .sparse_exec import POOLS, SparseConv2d, SparseLinear, SparsePool, ensure_dense_output
from .wta import WTADropout


def _twin_for(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
        return SparseConv2d(module)
    if type(module) is nn.Linear:
        return SparseLinear(module)
    if isinstance(module, POOLS) and not getattr(module, "return_indices", False):
        return SparsePool(module)
    return None


def _receivers(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the modules that receive a ``ChannelSparse`` as first input on ``sample``."""
    found: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: found.append(name)
                                         if args and isinstance(args[0], ChannelSparse) else None)
             for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(*sample)
    finally:
        for h in hooks:
            h.remove()
    return found


def _median_time(model: nn.Module, x: tuple[torch.Tensor, ...], repeats: int = 3) -> float:
    """Median seconds of ``repeats`` single calls ``model(*x)`` without autograd, each measured by
    ``Timer.timeit(1)`` after its two warm-up calls (9 calls in all: the tuner runs inside tests and conversions).
    The Timer runs at the process's thread count (its default would be one thread)."""
    timer = benchmark.Timer("model(*x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        return benchmark.Measurement.merge([timer.timeit(1) for _ in range(repeats)])[0].median


def to_sparse_execution(model: nn.Module, sample: tuple[torch.Tensor, ...], batch_sizes: Iterable[int] = (1,),
                        force: bool = False, fold: bool = True, prepack: bool = True, tune: bool = True,
                        timings: list[dict[str, Any]] | None = None) -> dict[str, list[int]]:
    """Switch the WTA modules of ``model`` to compact outputs and wrap the layers fed by them (see module doc).

    ``sample``: a representative input batch; each batch size in ``batch_sizes`` is built from its samples
    (cycled) and timed with the compact path and with the masked dense one; the compact path is used for the batch
    sizes where it is faster. ``tune=False``: it is used for every size in ``batch_sizes`` without timing
    (``sparse_execution: always``); ``force``: at every batch size (tests). ``fold``: fold BatchNorm / ReLU into the
    wrapped convs where the traced graph allows (see ``fuse``). ``prepack``: try prepacked conv kernels for each
    batch size run compactly (with ``force`` or ``tune=False``: use them for every size in ``batch_sizes``), where
    ``onednn`` can prepack (``onednn.prepack_available``; else no batch size gets them); the choice is in each
    ``SparseConv2d.prepacked_batches``. The compact path runs in eval mode without autograd (``torch.no_grad`` /
    ``inference_mode``); training and autograd use the masked dense path. Returns {wrapped layer name: batch
    sizes run compactly}. ``timings``: where given, one record per timed batch size is appended: ``{"batch",
    "dense_ms", "compact_ms", "prepacked_ms" (None where not timed), "compact", "prepacked"}`` (the last two: what
    was kept).
    """
    wta = [m for m in model.modules() if isinstance(m, WTADropout) and m.sparsity > 0]
    if not wta:
        return {}
    was_training = model.training
    model.eval()
    hook = None
    try:
        for m in wta:
            m.compact_always = True
        wrapped: list[str] = []
        while True:                    # a wrapped pool passes the compact form on, so look again downstream
            twins = {name: _twin_for(model.get_submodule(name)) for name in _receivers(model, sample)
                     if name not in wrapped}
            twins = {name: twin for name, twin in twins.items() if twin is not None}
            if not twins:
                break
            for name, twin in twins.items():
                model.set_submodule(name, twin)
                wrapped.append(name)
        if fold:
            fold_batchnorm(model)
        hook = ensure_dense_output(model)
        for m in wta:
            m.compact_always = force
        convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
        prepack = prepack and onednn.prepack_available()
        chosen = []
        if force:
            for m in convs:
                m.prepacked_batches = set(batch_sizes) if prepack else set()
        else:
            for b in batch_sizes:
                if not tune:
                    chosen.append(b)
                    for m in wta:
                        m.compact_batches.add(b)
                    for m in convs if prepack else ():
                        m.prepacked_batches.add(b)
                    continue
                xb = tuple(t[torch.arange(b) % t.shape[0]] for t in sample)
                for m in wta:
                    m.compact_batches.discard(b)
                dense_time = _median_time(model, xb)
                for m in wta:
                    m.compact_batches.add(b)
                compact_time = _median_time(model, xb)
                record = {"batch": b, "dense_ms": dense_time * 1e3, "compact_ms": compact_time * 1e3,
                          "prepacked_ms": None, "compact": compact_time < 0.95 * dense_time, "prepacked": False}
                if timings is not None:
                    timings.append(record)
                if not record["compact"]:
                    for m in wta:
                        m.compact_batches.discard(b)
                    continue
                chosen.append(b)
                if prepack and convs:     # costs only a packed copy of the kernel slices: kept on any gain
                    for m in convs:
                        m.prepacked_batches.add(b)
                    packed_time = _median_time(model, xb)
                    record["prepacked_ms"] = packed_time * 1e3
                    record["prepacked"] = packed_time < compact_time and any(m.prepacked_kernels() for m in convs)
                    if not record["prepacked"]:
                        for m in convs:
                            m.prepacked_batches.discard(b)
            if not chosen:             # no batch size gains: leave the model as it was
                unfold_batchnorm(model)
                for name in wrapped:
                    model.set_submodule(name, model.get_submodule(name).layer)
                if hook is not None:
                    hook.remove()
                wrapped = []
    finally:
        for m in wta:
            m.compact_always = force
        model.train(was_training)
    return {name: (list(batch_sizes) if force else chosen) for name in wrapped}


def prepacked_batch_sizes(model: nn.Module) -> list[int]:
    """Batch sizes for which ``model``'s compact convolutions use prepacked kernels (``to_sparse_execution``)."""
    return sorted(set().union(*(m.prepacked_batches for m in model.modules() if isinstance(m, SparseConv2d))))
