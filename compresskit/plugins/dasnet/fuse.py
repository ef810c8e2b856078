"""Fold eval-mode BatchNorm (and the ReLU after it) into the compact convolutions of the sparse path.

A conv's compact forward can apply the BatchNorm that follows it as a per output channel scale (folded into the
kernel slices it already cuts) and shift (the conv bias), and a ReLU after that inside the same oneDNN call. That
saves two full passes over each activation. The folded weight and bias are PyTorch's own
(``torch.nn.utils.fusion.fuse_conv_bn_weights``, what ``fuse_conv_bn_eval`` does to a dense conv), computed in
``sparse_exec`` when the kernel slices are cut and again whenever the conv's or the BatchNorm's tensors change.
Folding is only done where the model's traced graph (torch.fx) shows the conv's output goes to nothing but that
BatchNorm (and the BatchNorm's output to nothing but that ReLU); a model that does not trace keeps its twins
unfused. The BatchNorm and ReLU modules stay in the model, wrapped in ``PassFolded``: they pass the conv's fused
output through untouched (recognised by identity) and compute as before on anything else (training, the dense
path, other batch sizes).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from .sparse_exec import SparseConv2d, SparsePool, _SparseTwin
from .wta import WTADropout


class PassFolded(nn.Module):
    """A BatchNorm2d / ReLU whose work the compact conv ``source`` already did on its own output."""

    def __init__(self, layer: nn.Module, source: _SparseTwin, source_name: str = "") -> None:
        super().__init__()
        self.layer = layer
        self._source = (source,)          # a tuple, so the conv is not registered twice as a submodule
        self.source_name = source_name    # the conv's module name, for the layout record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._source[0].produced(x) else self.layer(x)

    def record_args(self) -> dict[str, Any]:
        """The conv that does this module's work (and, for a BatchNorm, whether it fuses the ReLU after it)."""
        return {"source": self.source_name, "relu": self._source[0].fused_relu}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "PassFolded":
        """Fold the BatchNorm / ReLU at ``name`` of ``model`` into the recorded sparse conv again."""
        source_name = str(args.get("source", ""))
        source = model.get_submodule(source_name) if source_name else None
        if not isinstance(source, SparseConv2d):
            raise ValueError(f"source {source_name!r} is not a sparse conv of the model")
        layer = model.get_submodule(name)
        if isinstance(layer, nn.BatchNorm2d):
            source.fold(layer, bool(args.get("relu")))
        return cls(layer, source, source_name)

    def to_dense(self) -> nn.Module:
        """The BatchNorm / ReLU itself (its conv unfolds in its own ``to_dense``)."""
        return self.layer


class _Tracer(fx.Tracer):
    """Traces into containers and user modules; stops at plain layers and the sparse path's own modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_SparseTwin, SparsePool, WTADropout, PassFolded)) or next(m.children(), None) is None


def conv_bn_relu_chains(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """(sparse conv, BatchNorm2d, ReLU or None) module names where the conv's output feeds only the BatchNorm and
    the BatchNorm's only the ReLU, each module called once. Empty when the model does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:                   # data-dependent control flow etc.: nothing is fused, results stay exact
        return []
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def sole_module_user(node: fx.Node, kind: type) -> fx.Node | None:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op != "call_module" or type(modules.get(user.target)) is not kind or calls[user.target] != 1 \
                or user.args != (node,) or user.kwargs:
            return None
        return user

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), SparseConv2d) \
                or calls[node.target] != 1:
            continue
        bn = sole_module_user(node, nn.BatchNorm2d)
        if bn is None or modules[bn.target].running_mean is None:      # batch statistics: nothing to fold
            continue
        relu = sole_module_user(bn, nn.ReLU)
        chains.append((node.target, bn.target, None if relu is None else relu.target))
    return chains


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every foldable BatchNorm (+ ReLU) into the sparse conv before it (see module doc). Returns the
    names of the modules now wrapped in ``PassFolded``."""
    wrapped = []
    for conv_name, bn_name, relu_name in conv_bn_relu_chains(model):
        twin = model.get_submodule(conv_name)
        twin.fold(model.get_submodule(bn_name), relu_name is not None)
        for name in (bn_name, relu_name):
            if name is not None:
                model.set_submodule(name, PassFolded(model.get_submodule(name), twin, conv_name))
                wrapped.append(name)
    return wrapped


def folded_batchnorms(model: nn.Module) -> int:
    """How many BatchNorms of ``model`` its compact convs apply (``fold_batchnorm``)."""
    return sum(isinstance(m, PassFolded) and isinstance(m.layer, nn.BatchNorm2d) for m in model.modules())


def unfold_batchnorm(model: nn.Module) -> None:
    """Undo ``fold_batchnorm``: the BatchNorm / ReLU modules back in place, the convs unfused."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PassFolded):
            model.set_submodule(name, m.layer)
        elif isinstance(m, _SparseTwin):
            m.unfold()
