"""HyPar communication model for training on 2^h accelerators (derivation in docs/hypar.md).

One binary split, two workers, batch ``B``. For weighted layer ``l``:

* data parallelism (``dp``): the batch is split, the kernel replicated. Each worker computes a partial weight
  gradient over its half batch; both need the sum -> each sends its partial: ``intra_dp = 2 * A(W_l)``.
* model parallelism (``mp``): the kernel is split by output channel; the input is needed whole; the output is split
  by channel. The weight gradient of each half is local: ``intra_mp = 0``. The input error is a *partial sum* on
  both workers; combining it is charged to the transition with the layer below, where its layout is known.

Between layer ``l`` and ``l+1`` (tensor ``A = B * input_elems(l+1)``, elements crossing in both directions):

=========  ==============================  ====================================  =======
l -> l+1   forward feature map             backward error                        total
=========  ==============================  ====================================  =======
dp -> dp   batch split stays: 0            batch split, complete: 0              0
dp -> mp   batch halves -> whole: A        partial sums -> own batch half: A     2A
mp -> dp   channel halves -> batch: A/2    batch halves -> channel halves: A/2   A
mp -> mp   channel halves -> whole: A      partial sums -> own channel half: A   2A
=========  ==============================  ====================================  =======

Hierarchy: at level ``k`` (0 = top) there are ``2^k`` pairs, each solving the same split on tensors reduced by the
choices above: a layer's kernel halves under each ``mp`` above, the boundary tensor (layer ``l+1``'s input) halves
under each ``dp`` of layer ``l+1`` above (its batch is split; under ``mp`` it needs its input whole).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .graph import LayerSpec

DP, MP = 0, 1
CHOICE_NAMES = ("dp", "mp")
# INTER[a][b]: multiple of the boundary tensor moved for choices (a of layer l, b of layer l+1)
INTER = np.array([[0.0, 2.0], [1.0, 2.0]])
INTER_FORWARD = np.array([[0.0, 1.0], [0.5, 1.0]])
INTRA_DP_FACTOR = 2.0

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def intra(layer: LayerSpec, choice: int, weight_scale: float = 1.0) -> float:
    """Elements crossing inside ``layer`` for one split (weight-gradient exchange under dp)."""
    return INTRA_DP_FACTOR * layer.weight_elems * weight_scale if choice == DP else 0.0


def inter(nxt: LayerSpec, a: int, b: int, batch: float) -> float:
    """Elements crossing between a layer with choice ``a`` and the next layer ``nxt`` with choice ``b``."""
    return INTER[a, b] * batch * nxt.input_elems


def bits(state: int, levels: int) -> list[int]:
    """Per-level choices of a hierarchical state (bit k = choice at level k, 0 = top)."""
    return [(state >> k) & 1 for k in range(levels)]


def level_tables(layers: Sequence[LayerSpec], batch: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Total elements of every layer and every pair of consecutive layers for every hierarchical state.

    Returns ``intra_cost[l, s]`` (layer ``l`` in state ``s``) and ``inter_cost[l, s, t]`` (layer ``l`` in ``s``,
    layer ``l+1`` in ``t``), with ``s, t`` in ``[0, 2^levels)`` and multiplicities ``2^k`` per level included.
    """
    n_states = 1 << levels
    states = np.arange(n_states)
    bit = (states[None, :] >> np.arange(levels)[:, None]) & 1                      # [levels, states]
    mult = (2.0 ** np.arange(levels))[:, None]
    mp_above = np.cumsum(np.vstack([np.zeros((1, n_states)), bit[:-1]]), axis=0)   # mp choices above level k
    dp_above = np.cumsum(np.vstack([np.zeros((1, n_states)), 1 - bit[:-1]]), axis=0)
    w_scale = 0.5 ** mp_above                                                      # [levels, states]
    a_scale = 0.5 ** dp_above
    weights = np.array([l.weight_elems for l in layers], dtype=np.float64)
    intra_per_state = ((bit == DP) * INTRA_DP_FACTOR * w_scale * mult).sum(0)     # [states] per weight element
    intra_cost = weights[:, None] * intra_per_state[None, :]
    factor = INTER[bit[:, :, None], bit[:, None, :]]                               # [levels, s, t]
    per_pair = (factor * a_scale[:, None, :] * mult[:, :, None]).sum(0)            # [s, t] per boundary element
    boundary = np.array([batch * l.input_elems for l in layers[1:]], dtype=np.float64)
    inter_cost = boundary[:, None, None] * per_pair[None, :, :]
    return intra_cost, inter_cost


def plan_cost(layers: Sequence[LayerSpec], states: Sequence[int], batch: int, levels: int) -> float:
    """Total elements moved by a hierarchical assignment (one state per layer), computed term by term."""
    total = 0.0
    for i, layer in enumerate(layers):
        cb = bits(states[i], levels)
        for k in range(levels):
            w_scale = 0.5 ** sum(cb[:k])
            total += 2**k * intra(layer, cb[k], w_scale)
            if i + 1 < len(layers):
                nb = bits(states[i + 1], levels)
                a_scale = 0.5 ** sum(1 - c for c in nb[:k])
                total += 2**k * inter(layers[i + 1], cb[k], nb[k], batch * a_scale)
    return total


GRADIENT, FORWARD, BACKWARD = 0, 1, 2


def level_terms(layers: Sequence[LayerSpec], states: Sequence[int], batch: int, levels: int) -> np.ndarray:
    """The terms of :func:`plan_cost` one by one: ``terms[l, k, p]`` are the elements charged to layer ``l`` at
    level ``k`` (multiplicity ``2^k`` included) in phase ``p``: its weight-gradient exchange (GRADIENT), and the
    forward feature map / backward error crossing on the transition to layer ``l+1`` (FORWARD, BACKWARD).
    ``terms.sum() == plan_cost(...)`` up to rounding."""
    terms = np.zeros((len(layers), levels, 3))
    backward = INTER - INTER_FORWARD
    for i, layer in enumerate(layers):
        cb = bits(states[i], levels)
        nb = bits(states[i + 1], levels) if i + 1 < len(layers) else None
        for k in range(levels):
            mult = 2.0**k
            terms[i, k, GRADIENT] = mult * intra(layer, cb[k], 0.5 ** sum(cb[:k]))
            if nb is not None:
                boundary = batch * 0.5 ** sum(1 - c for c in nb[:k]) * layers[i + 1].input_elems
                terms[i, k, FORWARD] = mult * INTER_FORWARD[cb[k], nb[k]] * boundary
                terms[i, k, BACKWARD] = mult * backward[cb[k], nb[k]] * boundary
    return terms
