"""HyPar on graphs, not only chains: residual and concat networks as a networkx DAG of weighted layers.

A :class:`LayerGraph` (a ``networkx.DiGraph``) has weighted layers as nodes (``spec``: :class:`~.chain.LayerSpec`,
``order``: execution index). An edge ``u -> v`` with ``elems`` (per sample) is a tensor that ``v`` consumes from
``u``'s output, through any non-weighted ops in between (activations, pooling, batch norm, flatten, add, concat);
it is charged like a chain transition (:func:`~.cost.pairwise_table`, sized by the consumer). Our conventions (AccPar
charges a shortcut the same way, from the block's input producer): an element-wise add is materialised in the layout
of its latest weighted input in execution order (the residual branch's last conv, or the 1x1 projection when it runs
after it, as in torchvision), so the shortcut becomes an edge from the shortcut's producer to that layer, charged
with the sum's full size, and the sum's consumers read it from that layer; a concat keeps its parts, so each branch
gets its own edge to every consumer with its part's size.

Charging the add in each *consumer's* layout instead (an edge from every addend's producer to every consumer of the
sum) counts a sum once per addend and, through chains of identity blocks, makes every later block read every earlier
one: on ResNet-50 the induced width grows from 2 to 8 and the exact search would need tables of 16^9 entries at 16
accelerators, where the convention above needs 16^3.

The cost of an assignment (one state per node) is a sum of node and edge terms, so the optimum over all
assignments is found exactly by min-sum variable elimination (:func:`dag_plan`), in time exponential only in the
induced width of the elimination order (2-3 on ResNets).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import networkx as nx
import numpy as np
import torch
from torch import nn

from .cost import StateSpace, pair_base, unary_table
from .chain import LAYER_META, LayerSpec, trace_shapes
from .search import Plan, joint_plan

MAX_FACTOR_ENTRIES = 50_000_000


class LayerGraph(nx.DiGraph):
    """A DAG of weighted layers: node attributes ``spec`` (:class:`~.chain.LayerSpec`) and ``order`` (execution
    index); edge attribute ``elems`` (elements per sample that the consumer reads from the producer's output).
    Build it with :func:`add_layer` / :func:`merge_add`, :func:`chain_graph`, :func:`graph_from_model`,
    :func:`resnet_graph` or :func:`inception_graph`; any ``networkx.DiGraph`` with these attributes plans the same."""

    def layer_names(self) -> list[Any]:
        """Node names in execution order (the order of a plan's states)."""
        return _nodes(self)

    def specs(self) -> list[LayerSpec]:
        """The layers in execution order."""
        return [self.nodes[v]["spec"] for v in _nodes(self)]


def _nodes(graph: nx.DiGraph) -> list[Any]:
    return sorted(graph.nodes, key=lambda n: graph.nodes[n]["order"])


def add_layer(graph: nx.DiGraph, spec: LayerSpec, sources: Sequence[tuple[str, float]]) -> str:
    """Add ``spec`` as the next node, consuming ``sources`` ((producer, elements per sample) pairs)."""
    if spec.name in graph:
        raise ValueError(f"layer '{spec.name}' is already in the graph: layer names must be unique")
    graph.add_node(spec.name, spec=spec, order=graph.number_of_nodes())
    for src, elems in sources:
        if graph.has_edge(src, spec.name):
            graph.edges[src, spec.name]["elems"] += elems
        else:
            graph.add_edge(src, spec.name, elems=float(elems))
    return spec.name


def merge_add(graph: nx.DiGraph, sources: Sequence[tuple[str, float]], elems: float) -> list[tuple[str, float]]:
    """An element-wise add of tensors from ``sources``: materialised in the layout of the latest producer, which
    receives an edge from every other one; returns the sum's sources."""
    names = sorted({s for s, _ in sources}, key=lambda n: graph.nodes[n]["order"])
    if not names:
        return []
    owner = names[-1]
    for other in names[:-1]:
        if graph.has_edge(other, owner):
            graph.edges[other, owner]["elems"] += elems
        else:
            graph.add_edge(other, owner, elems=float(elems))
    return [(owner, elems)]


def chain_graph(layers: Sequence[LayerSpec]) -> LayerGraph:
    """A chain as a graph: each layer consumes the previous one's output (``input_elems``)."""
    graph = LayerGraph()
    prev: list[tuple[str, float]] = []
    for spec in layers:
        prev = [(add_layer(graph, spec, [(p, spec.input_elems) for p, _ in prev]), spec.output_elems)]
    return graph


# ------------------------------------------------------------------------------------------------ from a model
def graph_from_model(model: nn.Module, sample_input: tuple[torch.Tensor, ...], *, model_path: str = "model",
                     input_path: str = "input_shape") -> LayerGraph:
    """Trace ``model`` (torch.fx + shape propagation, as :func:`~.chain.layers_from_model`, with its ConfigErrors)
    and build its graph of Conv/Linear layers; every other op passes its inputs' producers on (add / sub:
    :func:`merge_add`; one tensor input: the sizes rescaled to its output; concat and any other op with several
    tensor inputs: the parts keep their sizes). A module called more than once gives one node per call
    (``name#2``, ...)."""
    traced, _ = trace_shapes(model, sample_input, model_path=model_path, input_path=input_path)
    batch = int(sample_input[0].shape[0])
    graph = LayerGraph()
    sources: dict[Any, list[tuple[str, float]]] = {}

    def size(node: Any) -> float:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return 0.0
        return float(np.prod([int(d) for d in meta.shape])) / batch

    for node in traced.graph.nodes:
        inputs = [a for a in node.all_input_nodes if a in sources]
        spec = node.meta.get(LAYER_META)
        if spec is not None:
            name, k = spec.name, 1
            while name in graph:
                k += 1
                name = f"{spec.name}#{k}"
            spec = dataclasses.replace(spec, name=name)
            add_layer(graph, spec, [(s, e) for a in inputs for s, e in sources[a]])
            sources[node] = [(name, float(spec.output_elems))]
            continue
        out = size(node)
        srcs = [(s, e) for a in inputs for s, e in sources[a]]
        is_add = node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in (
            "add", "iadd", "__add__", "sub", "__sub__")
        if is_add and len(inputs) > 1:
            sources[node] = merge_add(graph, srcs, out)
        elif len(inputs) == 1:
            before = size(inputs[0])
            sources[node] = [(s, e * out / before if before else e) for s, e in srcs]
        else:                     # concat and the like: the parts keep their own sizes
            sources[node] = srcs
    return graph


# ------------------------------------------------------------------------------------------------ built-in graphs
def resnet_graph(depth: int) -> LayerGraph:
    """ResNet-18 / -34 / -50 / -101 on 224x224 ImageNet (He et al. 2016, torchvision's layout: stride on the 3x3 of a
    bottleneck, convs without bias): basic or bottleneck blocks, 1x1 projections where the shape changes, identity
    shortcuts elsewhere; adds as in the module docstring. Equal, edge for edge, to :func:`graph_from_model` on the
    same network (checked in the tests for ResNet-18)."""
    blocks = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
              101: ("bottleneck", [3, 4, 23, 3])}
    if depth not in blocks:
        raise ValueError(f"resnet depth {depth}: expected one of {sorted(blocks)}")
    kind, counts = blocks[depth]
    graph = LayerGraph()
    n = [0]

    def conv(cin: int, cout: int, k: int, hw_in: int, stride: int, srcs: list[tuple[str, float]]) -> tuple[str, int]:
        hw = hw_in // stride
        n[0] += 1
        spec = LayerSpec(f"conv{n[0]}", "conv", cin * hw_in * hw_in, cout * hw * hw, cout * cin * k * k,
                         cout * hw * hw * cin * k * k)
        return add_layer(graph, spec, [(s, cin * hw_in * hw_in) for s, _ in srcs]), hw

    stem, hw = conv(3, 64, 7, 224, 2, [])
    hw //= 2                                              # 3x3/2 max pool
    cur: list[tuple[str, float]] = [(stem, 64 * hw * hw)]
    cin = 64
    for stage, count in enumerate(counts):
        width = 64 * 2**stage
        cout = width * (4 if kind == "bottleneck" else 1)
        for b in range(count):
            stride = 2 if (b == 0 and stage > 0) else 1
            if kind == "basic":
                a, hw2 = conv(cin, width, 3, hw, stride, cur)
                last, hw2 = conv(width, width, 3, hw2, 1, [(a, 0)])
            else:
                a, _ = conv(cin, width, 1, hw, 1, cur)
                m, hw2 = conv(width, width, 3, hw, stride, [(a, 0)])
                last, hw2 = conv(width, cout, 1, hw2, 1, [(m, 0)])
            if stride != 1 or cin != cout:
                short, _ = conv(cin, cout, 1, hw, stride, cur)
                shortcut = [(short, 0.0)]
            else:
                shortcut = cur
            cur = merge_add(graph, [(last, 0.0), *shortcut], cout * hw2 * hw2)
            cin, hw = cout, hw2
    spec = LayerSpec("fc", "fc", cin, 1000, cin * 1000 + 1000, cin * 1000)   # after global average pooling
    add_layer(graph, spec, [(s, cin) for s, _ in cur])
    return graph


def inception_graph() -> LayerGraph:
    """An Inception-style graph (our construction): GoogLeNet's inception 3a and 3b modules (Szegedy et al. 2015,
    their channel counts) at 28 x 28, each four branches (1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3/1 max pool -> 1x1)
    concatenated; fed by a stand-in stem (one 3x3 conv 64 -> 192 at 28 x 28, not GoogLeNet's) and followed by
    global average pooling and a 1000-way classifier. 14 layers; every branch of a module feeds every consumer of
    the concat with its part."""
    graph = LayerGraph()
    hw = 28
    n = [0]

    def conv(cin: int, cout: int, k: int, srcs: list[tuple[str, float]]) -> str:
        n[0] += 1
        spec = LayerSpec(f"conv{n[0]}", "conv", cin * hw * hw, cout * hw * hw, cout * cin * k * k + cout,
                         cout * hw * hw * cin * k * k)
        return add_layer(graph, spec, srcs)

    stem = conv(64, 192, 3, [])
    cur = [(stem, 192.0 * hw * hw)]
    cin = 192
    for c1, r3, c3, r5, c5, pp in ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)):
        b1 = conv(cin, c1, 1, cur)
        b2 = conv(r3, c3, 3, [(conv(cin, r3, 1, cur), r3 * hw * hw)])
        b3 = conv(r5, c5, 5, [(conv(cin, r5, 1, cur), r5 * hw * hw)])
        b4 = conv(cin, pp, 1, cur)                         # after a 3x3/1 max pool: same size
        cur = [(b1, c1 * hw * hw), (b2, c3 * hw * hw), (b3, c5 * hw * hw), (b4, pp * hw * hw)]
        cin = c1 + c3 + c5 + pp
    spec = LayerSpec("fc", "fc", cin, 1000, cin * 1000 + 1000, cin * 1000)   # after global average pooling
    add_layer(graph, spec, [(s, e / (hw * hw)) for s, e in cur])
    return graph


# ------------------------------------------------------------------------------------------------ cost and search
def dag_cost(graph: nx.DiGraph, states: Sequence[int], batch: int, space: StateSpace) -> float:
    """Elements moved by an assignment (``states`` in execution order): every layer's own terms and every edge's
    transition (shortcuts and concat parts included)."""
    nodes = _nodes(graph)
    state = dict(zip(nodes, states))
    base = pair_base(space)
    total = sum(float(unary_table(graph.nodes[v]["spec"], batch, space, first=graph.in_degree(v) == 0)[state[v]])
                for v in nodes)
    total += sum(float(base[state[u], state[v]]) * batch * d["elems"] for u, v, d in graph.edges(data=True))
    return total


def _factors(graph: nx.DiGraph, batch: int, space: StateSpace) -> list[tuple[tuple[Any, ...], np.ndarray]]:
    base = pair_base(space)
    factors = [((v,), unary_table(graph.nodes[v]["spec"], batch, space, first=graph.in_degree(v) == 0))
               for v in _nodes(graph)]
    factors += [((u, v), base * (batch * d["elems"])) for u, v, d in graph.edges(data=True)]
    return factors


def _aligned(scope: tuple[Any, ...], table: np.ndarray, union: list[Any]) -> np.ndarray:
    """``table`` over ``scope`` broadcast to the axes of ``union``."""
    order = sorted(range(len(scope)), key=lambda i: union.index(scope[i]))
    moved = np.transpose(table, order)
    shape = [table.shape[0] if v in scope else 1 for v in union]
    return moved.reshape(shape)


def _fill_in(moral: nx.Graph, v: Any) -> int:
    """Edges that eliminating ``v`` would add between its neighbours (the min-fill heuristic)."""
    nb = list(moral.neighbors(v))
    return sum(1 for a, b in itertools.combinations(nb, 2) if not moral.has_edge(a, b))


def dag_plan(graph: nx.DiGraph, batch: int, space: StateSpace) -> Plan:
    """The optimal assignment by min-sum variable elimination; exact for any DAG. Raises
    ValueError when an intermediate table would exceed MAX_FACTOR_ENTRIES.
    Elimination order: min-fill, then min-degree."""
    factors = _factors(graph, batch, space)
    moral = nx.Graph(graph.to_undirected())
    remaining = set(moral.nodes)
    eliminated: list[tuple[Any, list[Any], np.ndarray]] = []
    constant = 0.0
    while remaining:
        v = min(remaining, key=lambda x: (_fill_in(moral, x), moral.degree(x), graph.nodes[x]["order"]))
        mine = [f for f in factors if v in f[0]]
        factors = [f for f in factors if v not in f[0]]
        union = sorted({x for scope, _ in mine for x in scope}, key=lambda x: graph.nodes[x]["order"])
        if space.size ** len(union) > MAX_FACTOR_ENTRIES:
            raise ValueError(f"exact DAG search needs a table of {space.size}^{len(union)} entries at "
                             f"'{v}'; use fewer accelerators or partitions")
        total = sum(_aligned(scope, table, union) for scope, table in mine)
        axis = union.index(v)
        rest = [x for x in union if x != v]
        eliminated.append((v, rest, np.argmin(total, axis=axis)))
        reduced = np.min(total, axis=axis)
        if rest:
            factors.append((tuple(rest), reduced))
        else:
            constant += float(reduced)
        neighbours = list(moral.neighbors(v))
        moral.add_edges_from(itertools.combinations(neighbours, 2))
        moral.remove_node(v)
        remaining.discard(v)
    assignment: dict[Any, int] = {}
    for v, rest, arg in reversed(eliminated):
        assignment[v] = int(arg[tuple(assignment[x] for x in rest)]) if rest else int(arg)
    states = [assignment[v] for v in _nodes(graph)]
    return Plan(states, dag_cost(graph, states, batch, space), space)


def chain_approximation(graph: nx.DiGraph, batch: int, space: StateSpace) -> Plan:
    """Plan the layers as a chain in execution order (consecutive layers only), then charge the whole graph."""
    layers = [graph.nodes[v]["spec"] for v in _nodes(graph)]
    chain = joint_plan(layers, batch, space)
    return Plan(chain.states, dag_cost(graph, chain.states, batch, space), space)


def exhaustive_dag_plan(graph: nx.DiGraph, batch: int, space: StateSpace) -> Plan:
    """Brute force over every assignment (tests only: exponential)."""
    best: Plan | None = None
    for states in itertools.product(range(space.size), repeat=graph.number_of_nodes()):
        cost = dag_cost(graph, states, batch, space)
        if best is None or cost < best.elements - 1e-9:
            best = Plan(list(states), cost, space)
    assert best is not None
    return best
