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
from compresskit.errors import ConfigError
from compresskit.plugins.hypar.dag import (LayerGraph, add_layer, chain_approximation, chain_graph, dag_cost,
                                           dag_plan, exhaustive_dag_plan, graph_from_model, inception_graph,
                                           resnet_graph)
from compresskit.plugins.hypar.chain import LayerSpec


def _random_dag(gen, n):
    graph = LayerGraph()
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
    assert isinstance(graph, LayerGraph) and graph.layer_names() == ["stem", "a", "b", "fc"]
    assert [s.input_elems for s in graph.specs()] == [3 * 64, 8 * 64, 8 * 64, 32]
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


class _Concat(nn.Module):
    """Two branches of different widths concatenated, pooled, then a conv reused twice (one node per call)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.left = nn.Conv2d(4, 6, 3, padding=1)
        self.right = nn.Conv2d(4, 2, 1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.left(x), torch.relu(self.right(x))], dim=1)
        return self.head(self.head(nn.functional.max_pool2d(y, 2)))


def test_traced_concat_model_gives_each_part_its_own_edge():
    graph = graph_from_model(_Concat(), (torch.randn(2, 3, 8, 8),))
    edges = {(u, v): d["elems"] for u, v, d in graph.edges(data=True)}
    assert graph.layer_names() == ["stem", "left", "right", "head", "head#2"]
    assert edges == {("stem", "left"): 4 * 64, ("stem", "right"): 4 * 64, ("left", "head"): 6 * 16,
                     ("right", "head"): 2 * 16, ("head", "head#2"): 8 * 16}


def test_untraceable_model_is_a_config_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ConfigError, match="cannot trace"):
        graph_from_model(Branchy(), (torch.randn(2, 4),), model_path="hypar.model")


class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class _ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (without torchvision)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], 64
        for stage, width in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(_Basic(cin, width, 2 if b == 0 and stage > 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def test_resnet18_builder_equals_the_traced_network():
    traced = graph_from_model(_ResNet18(), (torch.randn(1, 3, 224, 224),))
    built = resnet_graph(18)
    rename = dict(zip(traced.layer_names(), built.layer_names()))
    key = lambda s: (s.kind, s.input_elems, s.output_elems, s.weight_elems, s.macs)  # noqa: E731
    assert [key(s) for s in traced.specs()] == [key(s) for s in built.specs()]
    assert ({(rename[u], rename[v]): d["elems"] for u, v, d in traced.edges(data=True)}
            == {(u, v): d["elems"] for u, v, d in built.edges(data=True)})


def test_inception_graph_concat_parts():
    graph = inception_graph()
    assert graph.number_of_nodes() == 14 and nx.is_directed_acyclic_graph(graph)
    names = graph.layer_names()
    fc = graph.nodes[names[-1]]["spec"]
    into_fc = sum(d["elems"] for _, _, d in graph.in_edges(names[-1], data=True))
    assert graph.in_degree(names[-1]) == 4 and into_fc == fc.input_elems == 480
    # every consumer of module 3a's concat (3b's 1x1, its two reduces and its pool branch) reads all four parts
    consumers = [v for v in names if graph.in_degree(v) == 4 and v != names[-1]]
    assert len(consumers) == 4
    for v in consumers:
        assert sum(d["elems"] for _, _, d in graph.in_edges(v, data=True)) == 256 * 28 * 28
