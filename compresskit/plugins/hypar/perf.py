"""Step time and energy of a HyPar plan on an accelerator array: compute, memory traffic and links, not only bytes.

Per accelerator and layer (forward + backward, every partition splits the work evenly over the accelerators):

* compute: ``6 * macs * batch / accelerators`` FLOPs (2 per MAC forward; input error and weight gradient backward)
  at ``peak_flops``;
* memory: the local kernel read forward and backward and its gradient written (``3 W_local``), the local input read
  forward and backward and its error written (``3 F_local``), the local output written and its error read
  (``2 O_local``), at ``memory_bandwidth``. ``W_local`` halves under each mp / mp_out level, ``F_local`` under each
  dp / mp level, ``O_local`` under each dp / mp_out level (an mp layer's output is a whole partial sum). A layer
  takes the longer of the two (roofline);
* links: level ``k``'s elements (summed over all accelerators) / ``accelerators`` received by each accelerator at
  ``link_bandwidth``; pairs at the same level work at once.

Without overlap the step is the sum of the layers' times and all link time. With ``overlap`` the weight-gradient
exchange runs during the backward compute (the step pays ``max(backward, gradient exchange)``); partial sums and
re-layouts stay on the critical path. Energy = FLOPs x ``flop_joules`` + memory bytes x ``memory_byte_joules`` +
link bytes x ``link_byte_joules``, summed over all accelerators.

Every parameter of :data:`HMC_ACCELERATOR` comes from a published source (:data:`SOURCES`); none is fitted to the
paper's result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .cost import GRADIENT
from .chain import LayerSpec


@dataclass(frozen=True)
class AcceleratorSpec:
    """One accelerator of the array and its links."""

    name: str
    peak_flops: float             # FLOP/s per accelerator
    memory_bandwidth: float       # bytes/s per accelerator (its own stacked DRAM)
    link_bandwidth: float         # bytes/s one accelerator receives over the link of any level
    flop_joules: float            # J per FLOP
    memory_byte_joules: float     # J per byte read or written in the accelerator's DRAM
    link_byte_joules: float       # J per byte over a link
    overlap: bool = True          # weight-gradient exchange overlapped with backward compute


SOURCES = {
    "peak_flops": "Tetris (Gao et al., ASPLOS 2017), the HMC-based NN accelerator HyPar's array builds on: 16 vaults "
                  "x a 14 x 14 PE array at 500 MHz = 1.568e12 MAC/s = 3.136e12 FLOP/s",
    "memory_bandwidth": "HMC 2.1 specification (Hybrid Memory Cube Consortium, 2015): 10 GB/s per vault; 16 "
                        "vaults as in Tetris = 160 GB/s",
    "link_bandwidth": "HMC 2.1 specification: a full-width link is 16 lanes at up to 30 Gb/s = 60 GB/s per "
                      "direction; one link per accelerator per level",
    "flop_joules": "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm: FP32 multiply 3.7 pJ + add 0.9 pJ "
                   "= 4.6 pJ per MAC = 2.3 pJ/FLOP",
    "memory_byte_joules": "Jeddeloh & Keeth, 'Hybrid memory cube new DRAM architecture increases density and "
                          "performance', Symp. VLSI Technology 2012: 3.7 pJ/bit in the DRAM layers = 29.6 pJ/byte",
    "link_byte_joules": "Jeddeloh & Keeth 2012: 6.78 pJ/bit in the logic layer (SerDes links and controllers) of "
                        "the 10.48 pJ/bit total = 54.2 pJ/byte",
}

HMC_ACCELERATOR = AcceleratorSpec(
    name="HMC accelerator (Tetris-like)",
    peak_flops=16 * 14 * 14 * 500e6 * 2,
    memory_bandwidth=16 * 10e9,
    link_bandwidth=16 * 30e9 / 8,
    flop_joules=4.6e-12 / 2,
    memory_byte_joules=3.7e-12 * 8,
    link_byte_joules=6.78e-12 * 8,
)

# the paper's headline on 16 accelerators (Song et al., HyPar, HPCA 2019, abstract): geometric means over its ten
# networks against data parallelism
PAPER_HEADLINE = {"speedup": 3.39, "energy_efficiency": 1.51, "accelerators": 16}


@dataclass
class StepEstimate:
    """Modelled time (s) and energy (J) of one training step of a plan."""

    seconds: float
    compute_seconds: float
    memory_seconds: float
    comm_seconds: float
    joules: float
    compute_joules: float
    memory_joules: float
    link_joules: float
    layer_seconds: list[float] = field(default_factory=list)


def _halvings(choices: Sequence[str], *names: str) -> float:
    return 0.5 ** sum(c in names for c in choices)


def step_estimate(layers: Sequence[LayerSpec], terms: np.ndarray, choices: Sequence[Sequence[str]], batch: int,
                  accelerators: int, spec: AcceleratorSpec = HMC_ACCELERATOR, element_bytes: int = 4
                  ) -> StepEstimate:
    """The step estimate of one plan: ``terms`` from :func:`~.cost.level_terms` (``[layer, level, phase]``, all
    accelerators), ``choices[l]`` the layer's partition per level."""
    n = accelerators
    compute_s = memory_s = flops = mem_bytes = 0.0
    forward_s = backward_s = 0.0
    layer_s = []
    for layer, ch in zip(layers, choices):
        layer_flops = 6.0 * layer.macs * batch
        w_local = layer.weight_elems * _halvings(ch, "mp", "mp_out")
        f_local = batch * layer.input_elems * _halvings(ch, "dp", "mp")
        o_local = batch * layer.output_elems * _halvings(ch, "dp", "mp_out")
        local_bytes = (3 * w_local + 3 * f_local + 2 * o_local) * element_bytes
        c_s, m_s = layer_flops / n / spec.peak_flops, local_bytes / spec.memory_bandwidth
        t = max(c_s, m_s)
        layer_s.append(t)
        forward_s += t / 3
        backward_s += 2 * t / 3
        compute_s += c_s
        memory_s += m_s
        flops += layer_flops
        mem_bytes += local_bytes * n
    link_bytes = float(terms.sum()) * element_bytes
    per_acc = link_bytes / n / spec.link_bandwidth
    gradient_s = float(terms[..., GRADIENT].sum()) * element_bytes / n / spec.link_bandwidth
    if spec.overlap:
        seconds = forward_s + max(backward_s, gradient_s) + (per_acc - gradient_s)
    else:
        seconds = forward_s + backward_s + per_acc
    compute_j, memory_j, link_j = (flops * spec.flop_joules, mem_bytes * spec.memory_byte_joules,
                                   link_bytes * spec.link_byte_joules)
    return StepEstimate(seconds, compute_s, memory_s, per_acc, compute_j + memory_j + link_j, compute_j, memory_j,
                        link_j, layer_s)


def compare(estimates: dict[str, StepEstimate], baseline: str = "all data parallel") -> dict[str, dict[str, float]]:
    """Per plan: ``speedup`` (baseline seconds / plan seconds) and ``energy_efficiency`` (baseline J / plan J)."""
    base = estimates[baseline]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 1.0       # an empty network: nothing to compare

    return {name: {"speedup": ratio(base.seconds, e.seconds), "energy_efficiency": ratio(base.joules, e.joules)}
            for name, e in estimates.items()}


def geomean(values: Sequence[float]) -> float:
    """Geometric mean (the paper's way of averaging ratios over networks)."""
    return math.exp(sum(math.log(v) for v in values) / len(values))
