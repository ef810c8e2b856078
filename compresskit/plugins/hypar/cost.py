"""HyPar communication model for training on 2^h accelerators (derivation in docs/hypar.md).

One binary split, two workers, batch ``B``. For weighted layer ``l`` with input ``F_l`` / error ``E_l``, kernel
``W_l`` and output ``F_{l+1}`` (before any pooling) three partitions are modelled, all per accelerator:

* ``dp`` (data parallelism, AccPar's Type-I): batch split, kernel replicated; the weight gradient is a partial sum
  over each half batch and is exchanged: ``A(W_l)``.
* ``mp`` (HyPar's model parallelism, AccPar's Type-II, the default): the kernel is split by **input** channel; the
  output is a partial sum on both workers and is exchanged in the forward pass: ``A(F_{l+1})``.
* ``mp_out`` (AccPar's Type-III): the kernel is split by **output** channel; the input error is a partial sum and is
  exchanged in the backward pass: ``A(E_l)`` (nothing for the first layer, whose input needs no error).

Between ``l`` and ``l+1`` (``A = A(F_{l+1}) = A(E_{l+1})``, layer ``l+1``'s input), per accelerator:

=============  ==========  ==========  ===========
l -> l+1       forward     backward    total
=============  ==========  ==========  ===========
dp -> dp       0           0           0
dp -> mp       A/4         A/4         A/2
dp -> mp_out   A/2         0           A/2
mp -> dp       0           A/2         A/2
mp -> mp       0           A/2         A/2
mp -> mp_out   0           0           0
mp_out -> dp   A/4         A/4         A/2
mp_out -> mp   0           0           0
mp_out -> mp_out A/2       0           A/2
=============  ==========  ==========  ===========

The first three rows and ``mp -> *`` are HyPar's table (Song et al., HPCA 2019); the rest is AccPar's (Song et
al., HPCA 2020). Both workers move the same amount, so a pair moves twice the per-accelerator figure.

Hierarchy: level ``k`` (0 = top) splits each of its ``2^k`` groups in two, on tensors reduced by the layer's own
choices above: ``dp`` halves the batch of its maps and errors, ``mp`` halves its input channels and kernel,
``mp_out`` halves its output channels and kernel. A transition is sized by the consuming layer's input (AccPar's
convention). Totals are elements per training step summed over all accelerators.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .chain import LayerSpec

DP, MP, MP_OUT = 0, 1, 2
PARTITION_NAMES = ("dp", "mp", "mp_out")
DEFAULT_PARTITIONS = ("dp", "mp")

# [a, b]: multiple of A(F_{l+1}) one accelerator receives for choices a (layer l) and b (layer l+1)
FORWARD_FACTOR = np.array([[0.0, 0.25, 0.5],
                           [0.0, 0.0, 0.0],
                           [0.25, 0.0, 0.5]])
BACKWARD_FACTOR = np.array([[0.0, 0.25, 0.0],
                            [0.5, 0.5, 0.0],
                            [0.25, 0.0, 0.0]])
WORKERS = 2.0   # both workers of a pair receive the per-accelerator amount

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}

# phases of a term (the last axis of level_terms)
GRADIENT, PARTIAL_SUM, FORWARD, BACKWARD = 0, 1, 2, 3
PHASES = ("gradient", "partial_sum", "forward", "backward")


@dataclass(frozen=True)
class StateSpace:
    """The per-layer states of a hierarchical plan: one partition per level, each from ``partitions``.

    State ``s`` is a number in base ``len(partitions)``; digit ``k`` (least significant first) is the index into
    ``partitions`` of the choice at level ``k`` (0 = top)."""

    partitions: tuple[int, ...]
    levels: int

    @classmethod
    def of(cls, names: Sequence[str], levels: int) -> StateSpace:
        """The space for partition names (e.g. ``["dp", "mp", "mp_out"]``)."""
        return cls(tuple(PARTITION_NAMES.index(n) for n in names), levels)

    @property
    def size(self) -> int:
        """Number of states, ``len(partitions) ** levels``."""
        return len(self.partitions) ** self.levels

    def choices(self, state: int) -> tuple[int, ...]:
        """Partition codes (DP/MP/MP_OUT) per level, top first."""
        p = len(self.partitions)
        return tuple(self.partitions[(state // p**k) % p] for k in range(self.levels))

    def state(self, choices: Sequence[int]) -> int:
        """Inverse of :meth:`choices`."""
        p = len(self.partitions)
        return sum(self.partitions.index(c) * p**k for k, c in enumerate(choices))

    def uniform(self, choice: int) -> int:
        """The state with ``choice`` at every level."""
        return self.state([choice] * self.levels)

    def codes(self) -> np.ndarray:
        """``codes[s, k]``: the partition code of state ``s`` at level ``k`` (array ``[size, levels]``)."""
        return np.array([self.choices(s) for s in range(self.size)], dtype=np.int64).reshape(self.size,
                                                                                           self.levels)


@dataclass(frozen=True)
class Scales:
    """Size factors at one level from the choices above it: ``batch`` (dp), ``cin`` (mp), ``cout`` (mp_out)."""

    batch: float = 1.0
    cin: float = 1.0
    cout: float = 1.0

    @classmethod
    def above(cls, choices: Sequence[int]) -> Scales:
        """Scales from the choices made at the levels above."""
        return cls(0.5 ** sum(c == DP for c in choices), 0.5 ** sum(c == MP for c in choices),
                   0.5 ** sum(c == MP_OUT for c in choices))


def intra(layer: LayerSpec, choice: int, batch: float, scales: Scales = Scales(), first: bool = False) -> float:
    """Elements one accelerator receives inside ``layer`` for one split: the dp weight-gradient exchange, the mp
    output partial sums or the mp_out input-error partial sums."""
    if choice == DP:
        return layer.weight_elems * scales.cin * scales.cout
    if choice == MP:
        return batch * layer.output_elems * scales.batch * scales.cout
    return 0.0 if first else batch * layer.input_elems * scales.batch * scales.cin


def inter(nxt: LayerSpec, a: int, b: int, batch: float, scales: Scales = Scales()) -> tuple[float, float]:
    """(forward, backward) elements one accelerator receives between a layer with choice ``a`` and the next layer
    ``nxt`` with choice ``b``; ``scales`` are ``nxt``'s own from the levels above."""
    boundary = batch * nxt.input_elems * scales.batch * scales.cin
    return FORWARD_FACTOR[a, b] * boundary, BACKWARD_FACTOR[a, b] * boundary


def level_terms(layers: Sequence[LayerSpec], states: Sequence[int], batch: int, space: StateSpace) -> np.ndarray:
    """Every term of a plan: ``terms[l, k, p]`` are the elements (all accelerators, both directions) charged to
    layer ``l`` at level ``k`` in phase ``p``: GRADIENT (dp), PARTIAL_SUM (mp forward / mp_out backward), and the
    FORWARD / BACKWARD re-layout on the transition to layer ``l+1``."""
    terms = np.zeros((len(layers), space.levels, len(PHASES)))
    for i, layer in enumerate(layers):
        cb = space.choices(states[i])
        nb = space.choices(states[i + 1]) if i + 1 < len(layers) else None
        for k in range(space.levels):
            mult = WORKERS * 2.0**k
            terms[i, k, GRADIENT if cb[k] == DP else PARTIAL_SUM] = mult * intra(
                layer, cb[k], batch, Scales.above(cb[:k]), first=i == 0)
            if nb is not None:
                fwd, bwd = inter(layers[i + 1], cb[k], nb[k], batch, Scales.above(nb[:k]))
                terms[i, k, FORWARD], terms[i, k, BACKWARD] = mult * fwd, mult * bwd
    return terms


def executed_terms(layers: Sequence[LayerSpec], states: Sequence[int], batch: int, space: StateSpace) -> np.ndarray:
    """Elements :func:`~.parallel.parallelize` really moves, ``[layer, level, phase]`` like :func:`level_terms`.

    The paper's model charges a group of accelerators once for a tensor that is replicated over them. The execution
    differs from it in two places, both where a layer is ``mp`` at other levels than ``k``:

    * a re-layout at level ``k`` after a layer that is ``mp`` at ``m`` lower levels: its output is replicated over
      those ``2^m`` accelerators and each of them receives what the model charges their group once for (the
      transition terms times ``2^m``);
    * the ``dp`` gradient exchange at level ``k`` of a layer with a bias that is ``mp`` at ``m`` other levels: the
      bias is not split by input channel, so it is exchanged ``2^m`` times what the model charges."""
    terms = level_terms(layers, states, batch, space).copy()
    for i, layer in enumerate(layers):
        choices = space.choices(states[i])
        for k in range(space.levels):
            lower_mp = sum(1 for c in choices[k + 1:] if c == MP)
            if i + 1 < len(layers):
                terms[i, k, FORWARD] *= 2.0 ** lower_mp
                terms[i, k, BACKWARD] *= 2.0 ** lower_mp
            if choices[k] == DP and layer.bias_elems:
                other_mp = sum(1 for j, c in enumerate(choices) if c == MP and j != k)
                above = 0.5 ** sum(1 for c in choices[:k] if c in (MP, MP_OUT))
                terms[i, k, GRADIENT] += 2.0 ** (k + 1) * layer.bias_elems * above * (2.0 ** other_mp - 1)
    return terms


def plan_cost(layers: Sequence[LayerSpec], states: Sequence[int], batch: int, space: StateSpace) -> float:
    """Total elements moved by a hierarchical assignment (one state per layer)."""
    return float(level_terms(layers, states, batch, space).sum())


def _scale_table(space: StateSpace) -> tuple[np.ndarray, np.ndarray]:
    """``codes[s, k]`` and the three scale factors ``[3, s, k]`` (batch, cin, cout) at every level."""
    codes = space.codes()
    counts = np.zeros((3, space.size, space.levels))
    for k in range(1, space.levels):
        for c in (DP, MP, MP_OUT):
            counts[c, :, k] = (codes[:, :k] == c).sum(axis=1)
    return codes, 0.5 ** counts


def unary_table(layer: LayerSpec, batch: int, space: StateSpace, first: bool = False) -> np.ndarray:
    """Elements charged inside ``layer`` (all levels, all accelerators) for every state: array ``[size]``."""
    codes, scale = _scale_table(space)
    b, cin, cout = scale
    mult = WORKERS * 2.0 ** np.arange(space.levels)[None, :]
    per = np.where(codes == DP, layer.weight_elems * cin * cout,
                   np.where(codes == MP, batch * layer.output_elems * b * cout,
                            0.0 if first else batch * layer.input_elems * b * cin))
    return (per * mult).sum(axis=1)


def pair_base(space: StateSpace) -> np.ndarray:
    """Elements charged on an edge per element of its tensor (per sample, batch 1) for every pair of states
    (producer ``s``, consumer ``t``): array ``[size, size]``, sized by the consumer's scales."""
    codes, scale = _scale_table(space)
    b, cin, _ = scale
    factor = FORWARD_FACTOR + BACKWARD_FACTOR
    total = np.zeros((space.size, space.size))
    for k in range(space.levels):
        total += (WORKERS * 2.0**k) * factor[codes[:, k][:, None], codes[:, k][None, :]] * (b[:, k] * cin[:, k])[None, :]
    return total


def pairwise_table(elems: float, batch: int, space: StateSpace) -> np.ndarray:
    """Elements charged on an edge whose tensor has ``elems`` elements per sample, for every pair of states
    (producer ``s``, consumer ``t``): array ``[size, size]``."""
    return pair_base(space) * (batch * elems)


def chain_unary(layers: Sequence[LayerSpec], batch: int, space: StateSpace) -> np.ndarray:
    """``unary[l, s]``: elements charged inside layer ``l`` in state ``s`` (the chain's pairwise terms are
    ``pair_base(space) * batch * layers[l + 1].input_elems``)."""
    return np.stack([unary_table(l, batch, space, first=i == 0) for i, l in enumerate(layers)])


def all_assignments(n_layers: int, space: StateSpace):
    """Every assignment of states to ``n_layers`` layers (for brute-force checks: exponential)."""
    return itertools.product(range(space.size), repeat=n_layers)
