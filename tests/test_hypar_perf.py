"""HyPar's step-time and energy model: hand-computed numbers on a toy chain, overlap, and monotonicity."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compresskit.plugins.hypar.cost import GRADIENT, StateSpace, level_terms
from compresskit.plugins.hypar.chain import LayerSpec, paper_network
from compresskit.plugins.hypar.perf import HMC_ACCELERATOR, SOURCES, AcceleratorSpec, compare, step_estimate
from compresskit.plugins.hypar.search import baselines, hierarchical_plan

SPEC = AcceleratorSpec("toy", peak_flops=1e3, memory_bandwidth=1e3, link_bandwidth=10.0, flop_joules=1.0,
                       memory_byte_joules=0.1, link_byte_joules=0.01, overlap=False)


def test_hand_computed_step_and_energy():
    layers = [LayerSpec("a", "fc", 4, 2, 8, macs=8), LayerSpec("b", "fc", 2, 2, 4, macs=4)]
    terms = np.zeros((2, 1, 4))
    terms[0, 0, GRADIENT] = 20.0          # elements, all accelerators
    terms[1, 0, 2] = 40.0
    est = step_estimate(layers, terms, [["dp"], ["mp"]], batch=10, accelerators=2, spec=SPEC, element_bytes=1)
    # compute: 6 * macs * batch / 2 accelerators / 1e3 FLOP/s
    assert est.compute_seconds == pytest.approx((6 * 8 * 10 + 6 * 4 * 10) / 2 / 1e3)
    # memory (bytes per accelerator): a dp: W 8, F 10*4/2, O 10*2/2; b mp: W 4/2, F 10*2/2, O 10*2 (partial)
    mem_a, mem_b = 3 * 8 + 3 * 20 + 2 * 10, 3 * 2 + 3 * 10 + 2 * 20
    assert est.memory_seconds == pytest.approx((mem_a + mem_b) / 1e3)
    assert est.layer_seconds == pytest.approx([max(0.24, mem_a / 1e3), max(0.12, mem_b / 1e3)])
    assert est.comm_seconds == pytest.approx(60 / 2 / 10.0)
    assert est.seconds == pytest.approx(sum(est.layer_seconds) + 3.0)
    assert est.joules == pytest.approx(6 * 12 * 10 * 1.0 + (mem_a + mem_b) * 2 * 0.1 + 60 * 0.01)
    # overlapped: the gradient exchange (1 s) hides behind the backward part (2/3 of the layer time)
    over = step_estimate(layers, terms, [["dp"], ["mp"]], 10, 2, dataclasses.replace(SPEC, overlap=True), 1)
    back = 2 * sum(est.layer_seconds) / 3
    assert over.seconds == pytest.approx(sum(est.layer_seconds) / 3 + max(back, 1.0) + 2.0)
    assert over.joules == pytest.approx(est.joules)


def test_more_communication_never_lowers_time_and_compute_is_plan_independent():
    layers = paper_network("alexnet")
    space = StateSpace.of(["dp", "mp"], 4)
    plans = {"hypar": hierarchical_plan(layers, 128, space), **baselines(layers, 128, space)}
    est = {k: step_estimate(layers, level_terms(layers, p.states, 128, p.space),
                            [p.choices(i) for i in range(len(layers))], 128, 16) for k, p in plans.items()}
    assert len({round(e.compute_seconds, 12) for e in est.values()}) == 1
    assert len({round(e.compute_joules, 9) for e in est.values()}) == 1
    terms = level_terms(layers, plans["hypar"].states, 128, space)
    choices = [plans["hypar"].choices(i) for i in range(len(layers))]
    base = step_estimate(layers, terms, choices, 128, 16)
    more = step_estimate(layers, terms * 2, choices, 128, 16)
    assert more.seconds >= base.seconds and more.joules > base.joules
    ratios = compare(est)
    assert ratios["all data parallel"] == {"speedup": 1.0, "energy_efficiency": 1.0}
    assert ratios["hypar"]["speedup"] > 1 and ratios["hypar"]["energy_efficiency"] > 1


def test_every_parameter_has_a_source():
    fields = {f.name for f in dataclasses.fields(AcceleratorSpec)} - {"name", "overlap"}
    assert fields == set(SOURCES)
    assert HMC_ACCELERATOR.peak_flops == pytest.approx(3.136e12)
