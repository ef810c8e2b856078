"""``to_sparse_execution``: switch a WTA model to the compact inference path, fold BatchNorms, keep the fastest path.

The model's ``WTADropout`` modules are set to return ``ChannelSparse`` and every layer that receives one is
wrapped in its sparse twin (``sparse_exec``), repeating until nothing new is found (a wrapped pool passes the
compact form on to the layer behind it). BatchNorms (and ReLUs) right after a wrapped conv are folded into it
(``fuse``). Whether all that beats dense execution depends on the net, the batch size and the CPU, so each batch
size in ``batch_sizes`` is timed on every path and the fastest kept:

* ``masked``: the WTA model as trained (the masks applied, dense layers, BatchNorm unfolded);
* ``compact``: the compact path, and ``prepacked``: the same with kernel slices prepacked for oneDNN
  (``onednn.prepack_conv_weight``; skipped where ``onednn`` cannot prepack), and ``native``: the same with every
  compact convolution on the native kernel (``native/sparse_conv.cpp``, which reads the kept channels' rows of a
  weight packed once; timed for block WTA where the kernels are built: per-channel WTA's per-sample channel sets
  take it on every compact path);
* ``tuned``: the tuned dense form of the same WTA model: the masked input through the wrapped convolutions' whole
  kernels with their BatchNorm (and ReLU) folded in, prepacked for oneDNN (computing channels-last), as a tuned
  dense model runs.

A path other than ``masked`` is kept only where it is at least 5% faster; where no batch size gains, the model is
left exactly as it was (``tune=False``: the compact path for every size without timing). Timings are medians of a
few single calls, each after warm-up calls, taken with ``torch.utils.benchmark.Timer`` at the process's thread
count.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import benchmark

from . import native, onednn
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
    (cycled) and timed on every path (module doc); the fastest is used for that batch size (the tuned dense one's
    choice is in each ``SparseConv2d.tuned_dense_batches``). ``tune=False``: the compact path is used for every
    size in ``batch_sizes`` without timing
    (``sparse_execution: always``); ``force``: at every batch size (tests). ``fold``: fold BatchNorm / ReLU into the
    wrapped convs where the traced graph allows (see ``fuse``). ``prepack``: try prepacked conv kernels for each
    batch size run compactly (with ``force`` or ``tune=False``: use them for every size in ``batch_sizes``), where
    ``onednn`` can prepack (``onednn.prepack_available``; else no batch size gets them); the choice is in each
    ``SparseConv2d.prepacked_batches``. The compact path runs in eval mode without autograd (``torch.no_grad`` /
    ``inference_mode``); training and autograd use the masked dense path. Returns {wrapped layer name: batch
    sizes run compactly}. ``timings``: where given, one record per timed batch size is appended: ``{"batch",
    "dense_ms" (the masked path), "compact_ms", "prepacked_ms", "native_ms", "tuned_ms" (None where not timed),
    "compact", "prepacked", "native", "tuned"}`` (the last four: what was kept).
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
        lead = _wrap_dense_convs(model, wrapped)
        if fold:
            fold_batchnorm(model)
        model.eval()            # the twins and PassFolded wrappers are new modules, built in training mode
        hook = ensure_dense_output(model)
        for m in wta:
            m.compact_always = force
        convs = [m for m in model.modules() if isinstance(m, SparseConv2d) and m not in lead]
        prepack = prepack and onednn.prepack_available()
        chosen, tuned = [], []
        if force:
            for m in convs:
                m.prepacked_batches = set(batch_sizes) if prepack else set()
            for m in lead:
                m.tuned_dense_batches = set(batch_sizes)
        else:
            for b in batch_sizes:
                if not tune:
                    chosen.append(b)
                    _set_path(b, "prepacked" if prepack else "compact", wta, convs, lead)
                    continue
                record = _fastest_path(model, tuple(t[torch.arange(b) % t.shape[0]] for t in sample), b, wta,
                                       convs, prepack, lead)
                if timings is not None:
                    timings.append(record)
                if record["compact"]:
                    chosen.append(b)
                elif record["tuned"]:
                    tuned.append(b)
            for m in convs + lead:
                m.drop_unused_kernels()
            if not chosen and not tuned:   # no batch size gains: leave the model as it was
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
    lead_names = {name for name in wrapped if getattr(model.get_submodule(name), "dense_input", False)}
    return {name: (list(batch_sizes) if force else chosen) for name in wrapped if name not in lead_names}


PATHS = ("masked", "compact", "prepacked", "native", "tuned")
COMPACT_PATHS = ("compact", "prepacked", "native")


def _wrap_dense_convs(model: nn.Module, wrapped: list[str]) -> list[SparseConv2d]:
    """Wrap the convolutions that never receive WTA's compact output (the stem, which gets the image; any conv
    whose input no WTA feeds) in twins too, appending their names to ``wrapped``: on every path but the masked one they run as the tuned dense
    layer (BatchNorm folded, kernel prepacked), as the tuned dense model runs them. Left plain, PyTorch sends a
    small batch-1 input to its slower native convolution and applies the BatchNorm in a pass of its own."""
    lead = []
    inside = tuple(f"{name}." for name in wrapped)            # the plain layer a twin holds stays as it is
    for name, module in list(model.named_modules()):
        twin = _twin_for(module) if type(module) is nn.Conv2d and name not in wrapped \
            and not name.startswith(inside) else None
        if isinstance(twin, SparseConv2d):
            twin.dense_input = True
            model.set_submodule(name, twin)
            wrapped.append(name)
            lead.append(twin)
    return lead


def _set_path(batch: int, path: str, wta: list[WTADropout], convs: list[SparseConv2d],
              lead: list[SparseConv2d] = ()) -> None:
    """Run batches of size ``batch`` on ``path``: the masked dense model, the compact path (with prepacked kernel
    slices: ``prepacked``; on the native kernel: ``native``), or the tuned dense layers (whole kernels, BatchNorm
    folded, prepacked: ``tuned``).
    The ``lead`` convs (never fed by WTA) run as tuned dense layers on every path but the masked one."""
    for m in wta:
        (m.compact_batches.add if path in COMPACT_PATHS else m.compact_batches.discard)(batch)
    for m in convs:
        (m.prepacked_batches.add if path == "prepacked" else m.prepacked_batches.discard)(batch)
        (m.native_batches.add if path == "native" else m.native_batches.discard)(batch)
        (m.tuned_dense_batches.add if path == "tuned" else m.tuned_dense_batches.discard)(batch)
    for m in lead:
        (m.tuned_dense_batches.add if path != "masked" else m.tuned_dense_batches.discard)(batch)


def _fastest_path(model: nn.Module, x: tuple[torch.Tensor, ...], batch: int, wta: list[WTADropout],
                  convs: list[SparseConv2d], prepack: bool, lead: list[SparseConv2d] = ()) -> dict[str, Any]:
    """Time every path for inputs ``x`` of ``batch`` samples, set the fastest and return the timing record.

    The masked dense model is kept unless another path is at least 5% faster; prepacked slices are timed only
    where the compact path runs convolutions and ``onednn`` can prepack (they cost only a packed copy of the
    slices, so any gain keeps them), the native kernel only for block WTA where it is built, the tuned dense
    layers only where there are convolutions."""
    ms: dict[str, float | None] = {path: None for path in PATHS}
    blocks = any(m.blocks for m in wta)
    for path in PATHS:
        if path == "prepacked" and not (prepack and convs) or path == "tuned" and not convs \
                or path == "native" and not (convs and blocks and native.available()):
            continue
        _set_path(batch, path, wta, convs, lead)
        ms[path] = _median_time(model, x) * 1e3
        if path == "prepacked" and not any(m.prepacked_kernels() for m in convs):
            ms[path] = None               # no cacheable channel set: nothing was prepacked
    faster = {p: t for p, t in ms.items() if t is not None and p != "masked" and t < 0.95 * ms["masked"]}
    best = min(faster, key=faster.get) if faster else "masked"
    if best == "compact" and ms["prepacked"] is not None and ms["prepacked"] < ms["compact"]:
        best = "prepacked"
    _set_path(batch, best, wta, convs, lead)
    return {"batch": batch, "dense_ms": ms["masked"], "compact_ms": ms["compact"], "prepacked_ms": ms["prepacked"],
            "native_ms": ms["native"], "tuned_ms": ms["tuned"], "compact": best in COMPACT_PATHS,
            "prepacked": best == "prepacked", "native": best == "native", "tuned": best == "tuned"}


def tuned_dense_batch_sizes(model: nn.Module) -> list[int]:
    """Batch sizes for which ``model``'s wrapped convolutions run as the tuned dense layers (``to_sparse_execution``:
    the masked input through whole kernels with the BatchNorm folded, prepacked)."""
    return sorted(set().union(*(m.tuned_dense_batches for m in model.modules()
                                if isinstance(m, SparseConv2d) and not m.dense_input)))


def native_batch_sizes(model: nn.Module) -> list[int]:
    """Batch sizes for which all of ``model``'s compact convolutions run on the native kernel
    (``to_sparse_execution``; per-channel WTA's per-sample channel sets take it at every compact size)."""
    return sorted(set().union(*(m.native_batches for m in model.modules() if isinstance(m, SparseConv2d))))


def prepacked_batch_sizes(model: nn.Module) -> list[int]:
    """Batch sizes for which ``model``'s compact convolutions use prepacked kernels (``to_sparse_execution``)."""
    return sorted(set().union(*(m.prepacked_batches for m in model.modules() if isinstance(m, SparseConv2d))))
