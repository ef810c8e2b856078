"""Weighted-layer chains for HyPar: from a live model (torch.fx + shape propagation) or the paper's networks.

A :class:`LayerSpec` holds per-sample element counts: the layer's input feature map (= the tensor that crosses the
boundary from the previous weighted layer, after any pooling / activation in between), its output feature map and
its kernel. Errors have the sizes of the feature maps; weight gradients the size of the kernel.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ...errors import ConfigError
from ...registry import Registry


@dataclass(frozen=True)
class LayerSpec:
    """One weighted layer: sizes per sample (feature maps) and in total (kernel)."""

    name: str
    kind: str            # "conv" or "fc"
    input_elems: int     # elements of the input feature map per sample
    output_elems: int    # elements of the output feature map per sample
    weight_elems: int    # elements of the kernel (and of its gradient), bias included
    macs: int = 0        # multiply-accumulates of the forward pass per sample
    bias_elems: int = 0  # of ``weight_elems``, the bias (replicated where the kernel is split by input channel)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


LAYER_META = "hypar_layer"   # fx node meta key of a weighted layer's LayerSpec (set by trace_shapes)


class _ShapeProp(ShapeProp):
    """torch.fx ShapeProp that remembers the node it is running (for the error message)."""

    node: Any = None

    def run_node(self, n: Any) -> Any:
        self.node = n
        return super().run_node(n)


def layers_from_model(model: nn.Module, sample_input: tuple[torch.Tensor, ...], *, model_path: str = "model",
                      input_path: str = "input_shape") -> list[LayerSpec]:
    """Trace ``model`` with torch.fx, propagate shapes of ``sample_input`` and list its Conv/Linear layers in
    execution order. Sizes are per sample (the sample batch dimension is divided out).

    Errors are ConfigErrors naming ``model_path`` (untraceable model, no weighted layers) or ``input_path`` (the
    sample input does not fit the model): the caller passes the recipe fields they come from."""
    return trace_shapes(model, sample_input, model_path=model_path, input_path=input_path)[1]


def trace_shapes(model: nn.Module, sample_input: tuple[torch.Tensor, ...], *, model_path: str = "model",
                 input_path: str = "input_shape") -> tuple[Any, list[LayerSpec]]:
    """The traced ``torch.fx.GraphModule`` (its nodes carry ``tensor_meta``; a weighted layer's node also carries its
    :class:`LayerSpec` under ``meta[LAYER_META]``) and its weighted layers, as :func:`layers_from_model`."""
    from torch.fx import symbolic_trace

    try:
        traced = symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable control flow
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(model_path, f"cannot trace {type(model).__name__} with torch.fx ({first}); "
                                       f"use a paper network (hypar 'network:') or a traceable model") from None
    batch = int(sample_input[0].shape[0])
    was_training = model.training
    traced.eval()
    prop = _ShapeProp(traced)
    try:
        # ShapeProp prints the traceback of a failing node to stderr before re-raising: keep errors to one line
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*sample_input)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip()
        first = text.splitlines()[0] if text else type(cause).__name__
        at = f" at '{prop.node.target}'" if prop.node is not None else ""
        shape = "x".join(str(d) for d in sample_input[0].shape[1:])
        raise ConfigError(input_path, f"the sample input (per sample {shape}) does not fit "
                                      f"{type(model).__name__}{at}: {first}") from None
    finally:
        model.train(was_training)
    modules = dict(traced.named_modules())
    layers = []
    for node in traced.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        first = node.args[0] if node.args else None
        inp = first.meta.get("tensor_meta") if isinstance(first, torch.fx.Node) else None
        out = node.meta.get("tensor_meta")
        if inp is None or out is None:
            continue
        weight = sum(p.numel() for p in module.parameters(recurse=False))
        out_elems = _numel(out.shape) // batch
        layers.append(LayerSpec(str(node.target), "fc" if isinstance(module, nn.Linear) else "conv",
                                _numel(inp.shape) // batch, out_elems, weight, out_elems * module.weight[0].numel(),
                                0 if module.bias is None else module.bias.numel()))
        node.meta[LAYER_META] = layers[-1]
    if not layers:
        raise ConfigError(model_path, f"{type(model).__name__} has no Conv/Linear layers to plan")
    return traced, layers


# ------------------------------------------------------------------------------------------------ paper networks
def _chain(input_shape: tuple[int, int, int], spec: list) -> list[LayerSpec]:
    """Build a chain from a compact spec: ("conv", out, k, pad, stride) / ("pool", k[, stride]) / ("fc", out).

    Pooling rounds up, as Caffe's does (the paper's networks are Caffe models): cifar10_quick's 3x3/2 pools take
    32 -> 16 -> 8 -> 4, so its fc1 sees 64 x 4 x 4 = 1024 inputs."""
    c, h, w = input_shape
    layers: list[LayerSpec] = []
    pending_input = c * h * w
    n_conv = n_fc = 0
    for item in spec:
        kind = item[0]
        if kind == "conv":
            _, out, k, pad, stride = item
            h2, w2 = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            n_conv += 1
            layers.append(LayerSpec(f"conv{n_conv}", "conv", pending_input, out * h2 * w2, out * c * k * k + out,
                                    out * h2 * w2 * c * k * k))
            c, h, w = out, h2, w2
            pending_input = c * h * w
        elif kind == "pool":
            k = item[1]
            stride = item[2] if len(item) > 2 else k
            h, w = -(-(h - k) // stride) + 1, -(-(w - k) // stride) + 1
            pending_input = c * h * w
        elif kind == "fc":
            _, out = item
            n_fc += 1
            layers.append(LayerSpec(f"fc{n_fc}", "fc", pending_input, out, pending_input * out + out,
                                    pending_input * out))
            c, h, w = out, 1, 1
            pending_input = out
        else:  # pragma: no cover - specs are ours
            raise ValueError(kind)
    return layers


def _vgg(cfg: list) -> tuple[tuple[int, int, int], list]:
    spec: list = []
    for v in cfg:
        if v == "M":
            spec.append(("pool", 2))
        elif isinstance(v, tuple):               # (channels, kernel) for VGG-C's 1x1 convolutions
            spec.append(("conv", v[0], v[1], v[1] // 2, 1))
        else:
            spec.append(("conv", v, 3, 1, 1))
    return (3, 224, 224), spec + [("fc", 4096), ("fc", 4096), ("fc", 1000)]


_VGG = {
    "vgg-a": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg-b": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg-c": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512, (512, 1),
              "M"],
    "vgg-d": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg-e": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
              "M"],
}

# name -> (description, (input shape, chain spec for _chain)). The paper evaluates lenet-c, convnet, alexnet, the
# VGGs and two synthetic networks (sfc, sconv: our reading of their shapes); lenet is ours, not one of the paper's.
NetworkEntry = tuple[str, tuple[tuple[int, int, int], list]]

PAPER_NETWORKS: dict[str, NetworkEntry] = {
    "lenet": ("LeNet-300-100 on MNIST: 3 fully connected layers (ours: not one of the paper's networks)",
              ((1, 28, 28), [("fc", 300), ("fc", 100), ("fc", 10)])),
    "lenet-c": ("Caffe LeNet on MNIST: conv20-pool-conv50-pool-fc500-fc10",
                ((1, 28, 28), [("conv", 20, 5, 0, 1), ("pool", 2), ("conv", 50, 5, 0, 1), ("pool", 2),
                               ("fc", 500), ("fc", 10)])),
    "convnet": ("Caffe CIFAR-10 quick: conv32-pool-conv32-pool-conv64-pool-fc64-fc10",
                ((3, 32, 32), [("conv", 32, 5, 2, 1), ("pool", 3, 2), ("conv", 32, 5, 2, 1), ("pool", 3, 2),
                               ("conv", 64, 5, 2, 1), ("pool", 3, 2), ("fc", 64), ("fc", 10)])),
    "sfc": ("large fully connected net on MNIST: 784-8192-8192-8192-10 (the paper's SFC; shape is our reading)",
            ((1, 28, 28), [("fc", 8192), ("fc", 8192), ("fc", 8192), ("fc", 10)])),
    "sconv": ("small convolutional net on CIFAR-10: 4 conv (64, 128, 256, 256) + fc10 (the paper's SCONV; shape is "
              "our reading)",
              ((3, 32, 32), [("conv", 64, 3, 1, 1), ("pool", 2), ("conv", 128, 3, 1, 1), ("pool", 2),
                             ("conv", 256, 3, 1, 1), ("pool", 2), ("conv", 256, 3, 1, 1), ("pool", 2),
                             ("fc", 10)])),
    "alexnet": ("AlexNet on ImageNet: 5 conv + 3 fc",
                ((3, 227, 227), [("conv", 96, 11, 0, 4), ("pool", 3, 2), ("conv", 256, 5, 2, 1), ("pool", 3, 2),
                                 ("conv", 384, 3, 1, 1), ("conv", 384, 3, 1, 1), ("conv", 256, 3, 1, 1),
                                 ("pool", 3, 2), ("fc", 4096), ("fc", 4096), ("fc", 1000)])),
    **{name: (f"{name.upper()} (Simonyan & Zisserman) on ImageNet", _vgg(cfg)) for name, cfg in _VGG.items()},
}


# the paper networks as a Registry: an unknown name is the one did-you-mean error every registry gives
NETWORKS: Registry[NetworkEntry] = Registry("network", "network")
# the ten networks of the paper's evaluation (Song et al., HPCA 2019, Section 6), for its geometric means
PAPER_EVALUATED = ("sfc", "sconv", "lenet-c", "convnet", "alexnet", "vgg-a", "vgg-b", "vgg-c", "vgg-d", "vgg-e")
for _name, _entry in PAPER_NETWORKS.items():
    NETWORKS.add(_name, _entry)
del _name, _entry


def paper_network(name: str, path: str | None = None) -> list[LayerSpec]:
    """The weighted layers of one of the paper's evaluation networks (see PAPER_NETWORKS); ``path`` is the recipe
    field for the unknown-network error (default ``network``)."""
    shape, spec = NETWORKS.get(name.lower(), path)[1]
    return _chain(shape, spec)


def synthetic_chain(num_layers: int, seed: int = 0) -> list[LayerSpec]:
    """A deterministic pseudo-random chain of conv then fc layers (for planner timing on long networks)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    n_conv = num_layers * 3 // 4
    fmap = 64 * 56 * 56
    for i in range(num_layers):
        r = float(torch.rand(1, generator=gen))
        if i < n_conv:
            out = int(fmap * (0.5 + r))
            layers.append(LayerSpec(f"conv{i + 1}", "conv", fmap, out, int(9 * 256 * 256 * (0.25 + r))))
        else:
            out = int(4096 * (0.5 + r))
            layers.append(LayerSpec(f"fc{i + 1}", "fc", fmap, out, fmap * out))
        fmap = out if i >= n_conv - 1 else max(1024, out // (2 if r > 0.7 else 1))
    return layers
