"""Chunk quantization: INT8 / INT4 codes with one FP16 scale per chunk (symmetric, zero stays exactly zero), or
with one FP16 scale and offset per row (asymmetric, FBGEMM's row-wise layout).

A chunk of ``cs`` values ``v`` is stored as ``scale = max|v| / qmax`` (FP16, rounded up) and codes ``q = round(v / scale)`` in
``[-qmax, qmax]`` (``qmax`` 127 for INT8, 7 for INT4), packed as bytes: INT8 one code a byte, INT4 two (code + 8 in
a nibble, the even value in the low nibble). Dequantized: ``q * scale``.

One scale per chunk, not per row, because a chunk is what the store moves, prunes and regrows: the scale travels
with the chunk's slot like any per-slot buffer, and a row's chunks keep their own ranges (the leading chunks, which
every row keeps, are not squeezed by a tail chunk's outlier).

Row-wise (``scales: row``): a row's stored values ``v`` (every chunk it keeps) share ``scale = (max v - min v) /
(2^bits - 1)`` (FP16, rounded up) and ``offset = min v + 2^(bits-1) * scale`` (FP16), codes ``q = round((v - offset) /
scale)`` in ``[-2^(bits-1), 2^(bits-1) - 1]``, dequantized ``q * scale + offset``; the codes are the same bytes as
above (int8 two's complement, int4 ``q + 8`` in a nibble), so one decoder reads both. The pair is 4 bytes a row
(``[rows, 2]`` float16) instead of 2 bytes a stored chunk: smaller once rows keep more than two chunks on average,
and the full code range is used (no level is lost to symmetry). Re-quantizing one chunk of a row re-quantizes
the row (its range may have moved), so writes go through whole rows (``store.py``).

Rounding: ``nearest``, or ``stochastic`` (``floor(v / scale + u)``, ``u ~ U[0, 1)``): unbiased, so a training step
smaller than half a quantization step still moves the stored value in expectation instead of being rounded away.
"""
from __future__ import annotations

import torch

STORAGE_BITS = {"int8": 8, "int4": 4}
ROUNDING = ("stochastic", "nearest")
SCALES = ("chunk", "row")
_HALF_MAX = 65504.0


def qmax(bits: int) -> int:
    """Largest code magnitude: 127 (INT8) or 7 (INT4)."""
    return (1 << (bits - 1)) - 1


def code_bytes(bits: int, chunk_size: int) -> int:
    """Bytes of one chunk's codes."""
    if bits == 4 and chunk_size % 2:
        raise ValueError(f"int4 storage packs two values a byte: chunk_size must be even, got {chunk_size}")
    return chunk_size * bits // 8


def quantize(values: torch.Tensor, bits: int, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8 ``[n, code_bytes]``) and FP16 scales (``[n]``) of chunks ``values [n, cs]``."""
    values = values.detach().float()
    top = qmax(bits)
    absmax = values.abs().amax(1) if values.shape[1] else values.new_zeros(values.shape[0])
    scale = _round_up_half(absmax / top)      # rounded up: no code is clipped
    x = values / scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    return _encode(_round(x, rounding, generator).clamp(-top, top), bits), scale


def _round(x: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    if rounding == "stochastic":
        return torch.floor(x + torch.rand(x.shape, generator=generator))
    if rounding == "nearest":
        return torch.round(x)
    raise ValueError(f"rounding must be one of {', '.join(ROUNDING)}, got {rounding!r}")


def _round_up_half(exact: torch.Tensor) -> torch.Tensor:
    """``exact`` (float32, >= 0) as FP16, rounded up to the next FP16 value where rounding went down."""
    scale = exact.clamp(max=_HALF_MAX).half()
    low = scale.float() < exact.clamp(max=_HALF_MAX)
    return torch.where(low, (scale.view(torch.int16) + 1).view(torch.float16), scale)


def _encode(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8 ``[n, code_bytes]``) of integer values ``q [n, cs]`` in the code range."""
    q = q.to(torch.int8)
    if bits == 8:
        return q.view(torch.uint8)
    nib = (q + 8).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes ``[n, cs]`` (as float32) of packed codes."""
    if bits == 8:
        return codes.view(torch.int8).float()
    low = (codes & 0xF).to(torch.int16) - 8
    high = (codes >> 4).to(torch.int16) - 8
    return torch.stack([low, high], 2).reshape(codes.shape[0], 2 * codes.shape[1]).float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 chunks ``[n, cs]`` from codes and scales (see :func:`quantize`); ``scales [n, 2]`` (each chunk's
    row's scale and offset) for row-wise codes (:func:`quantize_rows`)."""
    q = _decode(codes, bits)
    if scales.dim() == 2:
        return q * scales[:, 0].float()[:, None] + scales[:, 1].float()[:, None]
    return q * scales.float()[:, None]


def quantize_rows(values: torch.Tensor, group: torch.Tensor, groups: int, bits: int, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise codes of chunks ``values [n, cs]``, chunk ``i`` belonging to row group ``group[i]`` (in ``[0,
    groups)``): codes (uint8 ``[n, code_bytes]``) and each group's FP16 (scale, offset) ``[groups, 2]`` (module
    docstring). A group without chunks gets (0, 0)."""
    values = values.detach().float()
    levels = float((1 << bits) - 1)
    inf = torch.full((groups,), float("inf"))
    lo = inf.scatter_reduce(0, group, values.amin(1) if values.shape[1] else inf[:0], "amin")
    hi = (-inf).scatter_reduce(0, group, values.amax(1) if values.shape[1] else inf[:0], "amax")
    empty = torch.isinf(lo)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    scale = _round_up_half((hi - lo) / levels)
    offset = (lo + float(1 << (bits - 1)) * scale.float()).clamp(-_HALF_MAX, _HALF_MAX).half()
    qparams = torch.stack([scale, offset], 1)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[group]
    x = (values - offset.float()[group][:, None]) / s[:, None]
    top = float((1 << (bits - 1)) - 1)
    return _encode(_round(x, rounding, generator).clamp(-top - 1, top), bits), qparams
