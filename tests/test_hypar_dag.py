"""HyPar on graphs: the exact DAG search against brute force, a chain as a graph equals the chain model, traced
residual models give their shortcut edges, and on ResNet-shaped graphs the exact plan is never worse than the chain
approximation."""
from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch
from torch import nn

from compresskit.plugins.hypar.cost import StateSpace, plan_cost
from compresskit.plugins.hypar.dag import (add_layer, chain_approximation, chain_graph, dag_cost, dag_plan,
                                           exhaustive_dag_plan, graph_from_model, inception_graph, resnet_graph)
from compresskit.plugins.hypar.graph import LayerSpec


def _random_dag(gen, n):
    graph = nx.DiGraph()
    names = []
    for i in range(n):
        spec = LayerSpec(f"l{i}", "conv", int(torch.randint(1, 900, (1,), generator=gen)),
                         int(torch.randint(1, 900, (1,), generator=gen)),
                         int(torch.randint(1, 90000, (1,), generator=gen)))
        srcs = [(names[j], float(torch.randint(1, 900, (1,), generator=gen)))
                for j in range(i) if torch.rand(1, generator=gen) < 0.6]
        names.append(add_layer(graph, spec, srcs))
    return graph


@pytest.mark.parametrize("names,levels", [(["dp", "mp"], 1), (["dp", "mp"], 2), (["dp", "mp", "mp_out"], 1),
                                          (["dp", "mp", "mp_out"], 2)])
def test_exact_dag_search_equals_brute_force(names, levels):
    gen = torch.Generator().manual_seed(levels * 10 + len(names))
    space = StateSpace.of(names, levels)
    for trial in range(5):
        n = 3 if space.size > 4 else 5
        graph = _random_dag(gen, n + trial % 2)
        best = exhaustive_dag_plan(graph, 32, space)
        plan = dag_plan(graph, 32, space)
        assert plan.elements == pytest.approx(best.elements)
        assert dag_cost(graph, plan.states, 32, space) == pytest.approx(plan.elements)
        assert plan.elements <= chain_approximation(graph, 32, space).elements + 1e-6


def test_a_chain_as_a_graph_is_the_chain_model():
    gen = torch.Generator().manual_seed(3)
    layers = [LayerSpec(f"l{i}", "fc", int(torch.randint(1, 500, (1,), generator=gen)), 7,
                        int(torch.randint(1, 5000, (1,), generator=gen))) for i in range(4)]
    space = StateSpace.of(["dp", "mp", "mp_out"], 2)
    graph = chain_graph(layers)
    for states in itertools.islice(itertools.product(range(space.size), repeat=4), 0, 6561, 97):
        assert dag_cost(graph, states, 16, space) == pytest.approx(plan_cost(layers, states, 16, space))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(x + y)), 1))


def test_traced_residual_model_has_its_shortcut_edge():
    graph = graph_from_model(_Residual(), (torch.randn(2, 3, 8, 8),))
    edges = {(u, v): d["elems"] for u, v, d in graph.edges(data=True)}
    # stem -> a (its input), stem -> b (the shortcut, added in b's layout), a -> b, b -> fc (pooled sum)
    assert edges == {("stem", "a"): 8 * 8 * 8, ("stem", "b"): 8 * 8 * 8, ("a", "b"): 8 * 8 * 8, ("b", "fc"): 32}
    space = StateSpace.of(["dp", "mp"], 2)
    assert dag_plan(graph, 8, space).elements == pytest.approx(exhaustive_dag_plan(graph, 8, space).elements)


@pytest.mark.parametrize("depth,n_layers", [(18, 21), (50, 54)])
def test_resnet_graphs_exact_is_never_worse_than_the_chain(depth, n_layers):
    graph = resnet_graph(depth)
    assert graph.number_of_nodes() == n_layers and nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_edges() > n_layers          # the shortcuts
    for names in (["dp", "mp"], ["dp", "mp", "mp_out"]):
        space = StateSpace.of(names, 4)
        exact = dag_plan(graph, 256, space)
        chain = chain_approximation(graph, 256, space)
        assert exact.elements <= chain.elements + 1e-6
        assert exact.elements <= dag_cost(graph, [space.uniform(0)] * n_layers, 256, space)


def test_too_wide_graph_is_refused():
    with pytest.raises(ValueError, match="exact DAG search needs a table"):
        dag_plan(inception_graph(), 256, StateSpace.of(["dp", "mp", "mp_out"], 4))
