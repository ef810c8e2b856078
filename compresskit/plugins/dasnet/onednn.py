"""The one place DASNet calls PyTorch's private oneDNN operators, with a public-API fallback.

The sparse path's convolutions want two things PyTorch offers only through private operators:

* oneDNN for every float32 CPU convolution (``torch.mkldnn_convolution``, and
  ``torch.ops.mkldnn._convolution_pointwise`` with a fused ReLU): PyTorch itself sends small batch-1 inputs
  (under 20480 elements) to its slower native im2col kernel, and compact inputs are small;
* *prepacked* kernels: a weight reordered once into oneDNN's blocked layout
  (``torch._C._nn.mkldnn_reorder_conv2d_weight``), so a convolution does not reorder it on every call.

Private operators may change or vanish in any release, so they are used only where ``probe`` finds them working:
once per process (cached) it checks the torch version against ``MIN_TORCH`` (the oldest release this was tested
on), that the build has oneDNN, that the operators exist, and that they compute a small strided, padded
convolution (plain, with fused ReLU, with a prepacked kernel) equal to ``torch.nn.functional.conv2d``. Missing
operators (AttributeError) or changed signatures / failures (RuntimeError, TypeError, NotImplementedError) make
the probe report them unavailable, with the reason.

Where they are unavailable or switched off (``use_private_ops(False)``, or the environment variable
``COMPRESSKIT_ONEDNN=0`` read at first use), ``conv2d`` is ``F.conv2d`` (then ``relu_``), bit for bit;
``prepack_conv_weight`` returns None, which the sparse path and the tuner (``convert``) read as "no prepacked
kernels". A kernel prepacked earlier still works after switching off (it is converted back to a plain tensor).
Results are the same either way up to float rounding; only the speed differs.

Nothing else in compresskit touches ``torch._C`` or ``torch.ops.mkldnn``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MIN_TORCH = (2, 13)      # the oldest torch release the private path was tested on; older ones use the fallback
ENV = "COMPRESSKIT_ONEDNN"


@dataclass(frozen=True)
class Support:
    """What ``probe`` found: whether the private convolution operators work (``conv``), whether prepacked kernels
    work too (``prepack``), and if not, why (``reason``; empty where both work)."""

    conv: bool
    prepack: bool
    reason: str = ""


_probed: Support | None = None
_ops: tuple[Any, Any, Any] | None = None      # (reorder, pointwise convolution, plain convolution)
_requested: bool | None = None                # use_private_ops(); None: the environment variable decides
_conv: bool | None = None                     # resolved: private convolutions in use (None: not resolved yet)
_prepack: bool = False                        # resolved: prepacked kernels in use


def _torch_version() -> tuple[int, int]:
    major, minor = (int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    return major, minor


def _lookup_ops() -> tuple[Any, Any, Any]:
    """The private operators (AttributeError where this torch lacks one)."""
    return (torch._C._nn.mkldnn_reorder_conv2d_weight, torch.ops.mkldnn._convolution_pointwise,
            torch.mkldnn_convolution)


def _private_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Sequence[int],
                  stride: Sequence[int], dilation: Sequence[int], groups: int, relu: bool) -> torch.Tensor:
    """The convolution on the private operators (``weight`` plain or prepacked)."""
    _, pointwise, plain = _ops
    if weight.is_mkldnn:        # oneDNN computes channels-last with a prepacked kernel; the output stays so
        return pointwise(x.contiguous(memory_format=torch.channels_last), weight, bias, padding, stride, dilation,
                         groups, "relu" if relu else "none", [None] if relu else [], "")
    if relu:
        return pointwise(x.contiguous(), weight, bias, padding, stride, dilation, groups, "relu", [None], "")
    return plain(x.contiguous(), weight, bias, padding, stride, dilation, groups)


def _private_prepack(weight: torch.Tensor, padding: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                     groups: int, input_shape: Sequence[int]) -> torch.Tensor:
    reorder = _ops[0]
    return reorder(weight.detach().to_mkldnn(), list(padding), list(stride), list(dilation), groups,
                   [1, *input_shape[1:]])


def _probe() -> Support:
    global _ops
    if _torch_version() < MIN_TORCH:
        return Support(False, False, f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, "
                                     "the oldest release the private oneDNN operators were tested on")
    if not torch.backends.mkldnn.is_available():
        return Support(False, False, "this torch build has no oneDNN (mkldnn)")
    try:
        _ops = _lookup_ops()
    except AttributeError as e:
        return Support(False, False, f"private oneDNN operator missing: {e}")
    g = torch.Generator().manual_seed(0)           # leaves the global random state alone
    x, w, b = torch.randn(2, 4, 7, 6, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)
    geometry = ((1, 0), (2, 1), (1, 1), 1)         # padding, stride, dilation, groups

    def close(y: torch.Tensor, expected: torch.Tensor) -> bool:
        return y.shape == expected.shape and torch.allclose(y, expected, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        ref = F.conv2d(x, w, b, geometry[1], geometry[0], geometry[2], geometry[3])
        try:
            conv = close(_private_conv(x, w, b, *geometry, relu=False), ref) and \
                close(_private_conv(x, w, b, *geometry, relu=True), ref.relu())
        except (RuntimeError, TypeError, NotImplementedError) as e:
            return Support(False, False, f"private oneDNN convolution failed: {e}")
        if not conv:
            return Support(False, False, "private oneDNN convolution differs from F.conv2d")
        try:
            packed = _private_prepack(w, *geometry, input_shape=x.shape)
            prepack = close(_private_conv(x, packed, b, *geometry, relu=False), ref)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            return Support(True, False, f"prepacked oneDNN convolution failed: {e}")
    return Support(True, prepack, "" if prepack else "prepacked oneDNN convolution differs from F.conv2d")


def probe(refresh: bool = False) -> Support:
    """Whether the private operators work on this torch (probed once and cached; ``refresh``: probe again). Says
    nothing about the switch (``use_private_ops``): see ``private_ops_enabled``."""
    global _probed, _conv
    if _probed is None or refresh:
        _probed = _probe()
        _conv = None                               # resolve the switch against the new result
    return _probed


def _env_allows() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _resolve() -> bool:
    global _conv, _prepack
    allowed = _env_allows() if _requested is None else _requested
    support = probe() if allowed else Support(False, False, "switched off")    # switched off: not even probed
    _conv, _prepack = allowed and support.conv, allowed and support.prepack
    return _conv


def use_private_ops(enabled: bool | None) -> bool | None:
    """Switch the private operators on (where ``probe`` finds them working) or off (``False``: the public
    fallback, e.g. for tests); ``None``: as the environment variable ``COMPRESSKIT_ONEDNN`` says (read again now;
    ``0`` / ``false`` / ``off`` / ``no``: off, otherwise on). Returns the previous setting, to restore it."""
    global _requested, _conv
    previous, _requested, _conv = _requested, enabled, None
    return previous


def private_ops_enabled() -> bool:
    """Whether convolutions run on the private oneDNN operators now (switch on and probe passed)."""
    return _resolve() if _conv is None else _conv


def prepack_available() -> bool:
    """Whether ``prepack_conv_weight`` prepacks now (else it returns None)."""
    if _conv is None:
        _resolve()
    return _prepack


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv2d`` runs ``conv`` on ``x`` through the private oneDNN operators (float32 on the CPU, numeric
    padding, private operators enabled)."""
    return (_resolve() if _conv is None else _conv) and x.is_cpu and x.dtype == torch.float32 \
        and not isinstance(conv.padding, str)


def prepack_conv_weight(weight: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int]) -> torch.Tensor | None:
    """``weight`` reordered once into oneDNN's blocked layout for ``conv``'s geometry on inputs shaped like
    ``input_shape`` (an opaque oneDNN tensor for ``conv2d``; it serves other batch sizes too). None where prepacked
    kernels are unavailable (see ``prepack_available``) or do not apply (not a float32 CPU weight, string
    padding): then pass the plain weight."""
    if not prepack_available() or weight.dtype != torch.float32 or not weight.is_cpu or isinstance(conv.padding, str):
        return None
    return _private_prepack(weight, conv.padding, conv.stride, conv.dilation, conv.groups, input_shape)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
           relu: bool = False) -> torch.Tensor:
    """``conv``'s convolution (its stride, zero padding, dilation, groups) of ``x`` with ``weight`` and ``bias``,
    then ReLU if ``relu``: on oneDNN where ``applies`` (the ReLU fused into the call), else ``F.conv2d``.

    With a prepacked ``weight`` (``prepack_conv_weight``) oneDNN computes in channels-last memory format and the
    output stays channels-last (``compact`` keeps that layout), so the activations are not converted back and forth
    around every convolution. PyTorch sends small batch-1 inputs (under 20480 elements) to its native im2col
    kernel, which is slower than oneDNN on the CPUs we measured; compact inputs are small, so they would fall under
    that rule where the dense layer did not. The benchmark gives the dense baseline the same kernel (see
    benchmarks/dasnet.py).
    """
    if weight.is_mkldnn:
        if _conv if _conv is not None else _resolve():
            return _private_conv(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, relu)
        weight = weight.to_dense()               # prepacked before the private path was switched off
    elif applies(x, conv):
        return _private_conv(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, relu)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y.relu_() if relu else y
