"""HyPar's communication model against a two-worker simulator that really splits the tensors of an MLP: every
assignment of dp / mp / mp_out computes autograd's outputs and gradients and moves exactly the modelled elements,
term by term."""
from __future__ import annotations

import itertools

import pytest
import torch

from compresskit.plugins.hypar import cost
from compresskit.plugins.hypar.cost import StateSpace, level_terms
from compresskit.plugins.hypar.chain import LayerSpec
from compresskit.plugins.hypar.simulate import TwoWorkerMLP, reference

TYPES = ["dp", "mp", "mp_out"]


def _mlp_layers(widths):
    return [LayerSpec(f"fc{i}", "fc", widths[i], widths[i + 1], widths[i] * widths[i + 1])
            for i in range(len(widths) - 1)]


@pytest.mark.parametrize("widths,batch", [([6, 8, 4, 10, 2], 4), ([12, 2, 16, 6], 8), ([4, 30, 30, 4], 2)])
def test_cost_model_equals_simulated_transfers(widths, batch):
    gen = torch.Generator().manual_seed(len(widths))
    weights = [torch.randn(widths[i + 1], widths[i], generator=gen) for i in range(len(widths) - 1)]
    x = torch.randn(batch, widths[0], generator=gen)
    target = torch.randn(batch, widths[-1], generator=gen)
    out_ref, grads_ref = reference(weights, x, target)
    sim = TwoWorkerMLP(weights, x, target)
    layers = _mlp_layers(widths)
    space = StateSpace.of(TYPES, 1)
    for choices in itertools.product(TYPES, repeat=len(weights)):
        result = sim.run(list(choices))
        # the split computation is the real one ...
        assert torch.allclose(result.output, out_ref, atol=1e-5), choices
        for got, want in zip(result.grads, grads_ref):
            assert torch.allclose(got, want, atol=1e-4), choices
        # ... and it moved exactly what the model says, term by term
        states = [space.state([cost.PARTITION_NAMES.index(c)]) for c in choices]
        model = level_terms(layers, states, batch, space)[:, 0, :]
        assert result.terms.tolist() == model.tolist(), choices


def test_the_per_accelerator_table_on_two_layers():
    """Each pair of choices on a 2-layer net: the forward and backward elements crossing the boundary equal the
    table in cost.py's docstring (per accelerator, x2 for the pair)."""
    batch, widths = 4, [6, 8, 2]
    weights = [torch.randn(8, 6), torch.randn(2, 8)]
    sim = TwoWorkerMLP(weights, torch.randn(batch, 6), torch.randn(batch, 2))
    boundary = batch * widths[1]
    for a, b in itertools.product(range(3), repeat=2):
        result = sim.run([TYPES[a], TYPES[b]])
        assert result.terms[0, cost.FORWARD] == 2 * cost.FORWARD_FACTOR[a, b] * boundary
        assert result.terms[0, cost.BACKWARD] == 2 * cost.BACKWARD_FACTOR[a, b] * boundary
        # intra terms: dp exchanges the kernel, mp the output (forward), mp_out the input error (not the first's)
        want = {0: 2 * 48, 1: 2 * batch * 8, 2: 0}[a]
        assert result.terms[0, cost.GRADIENT] + result.terms[0, cost.PARTIAL_SUM] == want


def test_odd_shapes_are_refused():
    with pytest.raises(ValueError, match="even"):
        TwoWorkerMLP([torch.randn(3, 4)], torch.randn(2, 4), torch.randn(2, 3))


@pytest.mark.parametrize("choices", [["dp", "mp"], ["mp_out", "dp"], ["dp", "mp_out"], ["mp", "dp"], ["mp", "mp"]])
def test_a_worker_never_computes_with_data_it_does_not_hold(monkeypatch, choices):
    """Without the fetches (every choice pair here moves something) the workers lack data they compute with, and
    the simulator refuses instead of silently computing with zeros."""
    monkeypatch.setattr(TwoWorkerMLP, "_fetch", staticmethod(lambda store, w, name, need: 0))
    sim = TwoWorkerMLP([torch.randn(8, 6), torch.randn(2, 8)], torch.randn(4, 6), torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="does not hold"):
        sim.run(choices)
