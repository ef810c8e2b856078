"""HyPar search: the layer-wise dynamic program (Viterbi over layer states) and its hierarchical application.

* :func:`hierarchical_plan` is the paper's procedure: level by level from the top, one two-state DP per level on
  tensor sizes reduced by the choices already made above.
* :func:`joint_plan` runs one DP whose per-layer state is the tuple of choices at every level (``2^h`` states), so it
  is optimal over all hierarchical assignments (checked against :func:`exhaustive_plan` in the tests).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .cost import DP, MP, bits, inter, intra, level_tables, level_terms, plan_cost
from .graph import LayerSpec


@dataclass
class Plan:
    """One state per layer (bit k = choice at level k) and its total communication in elements."""

    states: list[int]
    elements: float
    levels: int

    def choices(self, layer: int) -> list[str]:
        """'dp'/'mp' per level (top first) for one layer."""
        return ["mp" if b else "dp" for b in bits(self.states[layer], self.levels)]


def viterbi(unary: np.ndarray, pairwise: np.ndarray) -> tuple[list[int], float]:
    """Minimise ``sum_l unary[l, s_l] + sum_l pairwise[l, s_l, s_{l+1}]`` over state sequences."""
    n_layers = unary.shape[0]
    best = unary[0].copy()
    back = np.zeros((n_layers, unary.shape[1]), dtype=np.int64)
    for l in range(1, n_layers):
        cand = best[:, None] + pairwise[l - 1]                   # [prev state, state]
        back[l] = np.argmin(cand, axis=0)
        best = cand[back[l], np.arange(unary.shape[1])] + unary[l]
    path = [int(np.argmin(best))]
    for l in range(n_layers - 1, 0, -1):
        path.append(int(back[l, path[-1]]))
    return path[::-1], float(best.min())


def one_split(layers: Sequence[LayerSpec], batch: float, weight_scale: Sequence[float] | None = None,
              boundary_scale: Sequence[float] | None = None) -> tuple[list[int], float]:
    """The layer-wise DP for one binary split (two workers); optional per-layer size scales from levels above."""
    n = len(layers)
    ws = weight_scale or [1.0] * n
    bs = boundary_scale or [1.0] * n
    unary = np.array([[intra(l, DP, ws[i]), intra(l, MP, ws[i])] for i, l in enumerate(layers)])
    pairwise = np.array([[[inter(layers[i + 1], a, b, batch * bs[i + 1]) for b in (DP, MP)] for a in (DP, MP)]
                         for i in range(n - 1)]).reshape(max(n - 1, 0), 2, 2)
    return viterbi(unary, pairwise)


def hierarchical_plan(layers: Sequence[LayerSpec], batch: int, levels: int) -> Plan:
    """The paper's hierarchical layer-wise DP: one two-state DP per level, top-down."""
    n = len(layers)
    states = [0] * n
    total = 0.0
    for k in range(levels):
        w_scale = [0.5 ** sum(bits(states[i], k)) for i in range(n)]                       # mp above halves W
        b_scale = [0.5 ** sum(1 - c for c in bits(states[i], k)) for i in range(n)]        # dp above halves batch
        choice, cost = one_split(layers, batch, w_scale, b_scale)
        total += 2**k * cost
        states = [s | (c << k) for s, c in zip(states, choice)]
    return Plan(states, total, levels)


def joint_plan(layers: Sequence[LayerSpec], batch: int, levels: int) -> Plan:
    """Optimal hierarchical assignment: Viterbi over the ``2^levels`` per-layer states."""
    intra_cost, inter_cost = level_tables(layers, batch, levels)
    states, total = viterbi(intra_cost, inter_cost)
    return Plan(states, total, levels)


def exhaustive_plan(layers: Sequence[LayerSpec], batch: int, levels: int) -> Plan:
    """Brute force over all ``2^(levels * layers)`` assignments (tests only: exponential)."""
    best: Plan | None = None
    for states in itertools.product(range(1 << levels), repeat=len(layers)):
        cost = plan_cost(layers, states, batch, levels)
        if best is None or cost < best.elements - 1e-9:
            best = Plan(list(states), cost, levels)
    assert best is not None
    return best


def uniform_plan(layers: Sequence[LayerSpec], batch: int, levels: int, conv: int, fc: int) -> Plan:
    """Every level: ``conv`` choice for conv layers and ``fc`` choice for fully connected layers."""
    full = (1 << levels) - 1
    states = [(full if (conv if l.kind == "conv" else fc) == MP else 0) for l in layers]
    return Plan(states, plan_cost(layers, states, batch, levels), levels)


def baselines(layers: Sequence[LayerSpec], batch: int, levels: int) -> dict[str, Plan]:
    """All data parallel, all model parallel, and 'one weird trick' (dp convolutions, mp fully connected)."""
    return {
        "all data parallel": uniform_plan(layers, batch, levels, DP, DP),
        "all model parallel": uniform_plan(layers, batch, levels, MP, MP),
        "one weird trick": uniform_plan(layers, batch, levels, DP, MP),
    }


def layer_costs(layers: Sequence[LayerSpec], plan: Plan, batch: int) -> list[float]:
    """Elements charged to each layer: its own weight-gradient exchange plus the transition to the next layer."""
    return [float(v) for v in level_terms(layers, plan.states, batch, plan.levels).sum(axis=(1, 2))]
