"""Chunk quantization: INT8 / INT4 codes with one FP16 scale per chunk (symmetric, zero stays exactly zero).

A chunk of ``cs`` values ``v`` is stored as ``scale = max|v| / qmax`` (FP16, rounded up) and codes ``q = round(v / scale)`` in
``[-qmax, qmax]`` (``qmax`` 127 for INT8, 7 for INT4), packed as bytes: INT8 one code a byte, INT4 two (code + 8 in
a nibble, the even value in the low nibble). Dequantized: ``q * scale``.

One scale per chunk, not per row, because a chunk is what the store moves, prunes and regrows: the scale travels
with the chunk's slot like any per-slot buffer, and a row's chunks keep their own ranges (the leading chunks, which
every row keeps, are not squeezed by a tail chunk's outlier).

Rounding: ``nearest``, or ``stochastic`` (``floor(v / scale + u)``, ``u ~ U[0, 1)``): unbiased, so a training step
smaller than half a quantization step still moves the stored value in expectation instead of being rounded away.
"""
from __future__ import annotations

import torch

STORAGE_BITS = {"int8": 8, "int4": 4}
ROUNDING = ("stochastic", "nearest")
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
    exact = (absmax / top).clamp(max=_HALF_MAX)
    scale = exact.half()
    low = scale.float() < exact      # round the FP16 scale up (the next FP16 value): no code is clipped
    scale = torch.where(low, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    x = values / scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    if rounding == "stochastic":
        x = torch.floor(x + torch.rand(x.shape, generator=generator))
    elif rounding == "nearest":
        x = torch.round(x)
    else:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING)}, got {rounding!r}")
    q = x.clamp(-top, top).to(torch.int8)
    if bits == 8:
        return q.view(torch.uint8), scale
    nib = (q + 8).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 chunks ``[n, cs]`` from codes and scales (see :func:`quantize`)."""
    if bits == 8:
        q = codes.view(torch.int8).float()
    else:
        low = (codes & 0xF).to(torch.int16) - 8
        high = (codes >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], 2).reshape(codes.shape[0], 2 * codes.shape[1]).float()
    return q * scales.float()[:, None]
