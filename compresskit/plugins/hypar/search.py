"""HyPar search: the layer-wise dynamic program (Viterbi over layer states) and its hierarchical application.

* :func:`hierarchical_plan` is the paper's procedure: level by level from the top, one DP per level over the
  allowed partitions, on tensor sizes reduced by the choices already made above.
* :func:`joint_plan` runs one DP whose per-layer state is the tuple of choices at every level (``P^h`` states for
  ``P`` partitions), so it is optimal over all hierarchical assignments (checked against :func:`exhaustive_plan`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .cost import (DP, MP, MP_OUT, PARTITION_NAMES, Scales, StateSpace, all_assignments, chain_unary, inter, intra,
                   pair_base, plan_cost)
from .chain import LayerSpec

MAX_JOINT_STATES = 4096   # P^h per layer; beyond it the joint DP's P^2h pairs per layer take too long


@dataclass
class Plan:
    """One state per layer (see :class:`~.cost.StateSpace`) and its total communication in elements."""

    states: list[int]
    elements: float
    space: StateSpace

    @property
    def levels(self) -> int:
        """Levels of the hierarchy."""
        return self.space.levels

    def codes(self, layer: int) -> tuple[int, ...]:
        """Partition codes (DP/MP/MP_OUT) per level, top first, of one layer."""
        return self.space.choices(self.states[layer])

    def choices(self, layer: int) -> list[str]:
        """'dp' / 'mp' / 'mp_out' per level (top first) for one layer."""
        return [PARTITION_NAMES[c] for c in self.codes(layer)]


def viterbi(unary: np.ndarray, pairwise: Callable[[int], np.ndarray]) -> tuple[list[int], float]:
    """Minimise ``sum_l unary[l, s_l] + sum_l pairwise(l)[s_l, s_{l+1}]`` over state sequences."""
    n_layers, n_states = unary.shape
    best = unary[0].copy()
    back = np.zeros((n_layers, n_states), dtype=np.int64)
    for l in range(1, n_layers):
        cand = best[:, None] + pairwise(l - 1)                   # [prev state, state]
        back[l] = np.argmin(cand, axis=0)
        best = cand[back[l], np.arange(n_states)] + unary[l]
    path = [int(np.argmin(best))]
    for l in range(n_layers - 1, 0, -1):
        path.append(int(back[l, path[-1]]))
    return path[::-1], float(best.min())


def one_split(layers: Sequence[LayerSpec], batch: float, partitions: Sequence[int] = (DP, MP),
              scales: Sequence[Scales] | None = None) -> tuple[list[int], float]:
    """The layer-wise DP for one binary split (two workers, per-accelerator elements); ``scales`` are the
    per-layer size factors from the levels above. Returns partition codes per layer and the cost."""
    n = len(layers)
    sc = list(scales) if scales is not None else [Scales()] * n
    unary = np.array([[intra(l, c, batch, sc[i], first=i == 0) for c in partitions] for i, l in enumerate(layers)])

    def pairwise(i: int) -> np.ndarray:
        return np.array([[sum(inter(layers[i + 1], a, b, batch, sc[i + 1])) for b in partitions]
                         for a in partitions])

    idx, cost = viterbi(unary, pairwise)
    return [partitions[j] for j in idx], cost


def hierarchical_plan(layers: Sequence[LayerSpec], batch: int, space: StateSpace) -> Plan:
    """The paper's hierarchical layer-wise DP: one DP over the allowed partitions per level, top-down."""
    n = len(layers)
    codes: list[list[int]] = [[] for _ in range(n)]
    for k in range(space.levels):
        choice, _ = one_split(layers, batch, space.partitions, [Scales.above(c) for c in codes])
        for i, c in enumerate(choice):
            codes[i].append(c)
    states = [space.state(c) for c in codes]
    return Plan(states, plan_cost(layers, states, batch, space), space)


def joint_plan(layers: Sequence[LayerSpec], batch: int, space: StateSpace) -> Plan:
    """Optimal hierarchical assignment: Viterbi over the ``P^levels`` per-layer states."""
    base = pair_base(space)
    states, total = viterbi(chain_unary(layers, batch, space),
                            lambda i: base * (batch * layers[i + 1].input_elems))
    return Plan(states, total, space)


def exhaustive_plan(layers: Sequence[LayerSpec], batch: int, space: StateSpace) -> Plan:
    """Brute force over all ``(P^levels)^layers`` assignments (tests only: exponential)."""
    best: Plan | None = None
    for states in all_assignments(len(layers), space):
        cost = plan_cost(layers, states, batch, space)
        if best is None or cost < best.elements - 1e-9:
            best = Plan(list(states), cost, space)
    assert best is not None
    return best


def uniform_plan(layers: Sequence[LayerSpec], batch: int, space: StateSpace, conv: int, fc: int) -> Plan:
    """Every level: ``conv`` choice for conv layers and ``fc`` choice for fully connected layers (the choices are
    evaluated even when ``space`` does not search them)."""
    full = StateSpace((DP, MP, MP_OUT), space.levels)
    states = [full.uniform(conv if l.kind == "conv" else fc) for l in layers]
    return Plan(states, plan_cost(layers, states, batch, full), full)


def baselines(layers: Sequence[LayerSpec], batch: int, space: StateSpace) -> dict[str, Plan]:
    """All data parallel, all model parallel (each model-parallel partition searched), and 'one weird trick'
    (dp convolutions, model-parallel fully connected layers: Krizhevsky 2014 splits them by output neuron)."""
    out = {"all data parallel": uniform_plan(layers, batch, space, DP, DP)}
    mps = [c for c in space.partitions if c != DP] or [MP]
    for c in mps:
        suffix = "" if len(mps) == 1 else f" ({PARTITION_NAMES[c]})"
        out[f"all model parallel{suffix}"] = uniform_plan(layers, batch, space, c, c)
    owt = MP_OUT if MP_OUT in space.partitions else MP
    out["one weird trick"] = uniform_plan(layers, batch, space, DP, owt)
    return out

