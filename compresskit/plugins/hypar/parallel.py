"""Running a HyPar plan: :func:`parallelize` lays out a chain model on ``2^h`` torch.distributed processes.

Process ``r`` sits at coordinates ``(c_0, ..., c_{h-1})`` of a device mesh of shape ``(2,) * h`` (level 0, the top
of the hierarchy, is the most significant bit of ``r``). Every tensor that crosses between weighted layers has a
*role* per level: ``B`` (split by batch), ``C`` (split by channel / feature) or ``R`` (replicated, complete). A
dimension of size ``n`` is cut into ``2^h`` blocks and level ``k`` owns bit ``h-1-k`` of the block index, so a
level's split means the same blocks whatever the other levels do. A layer with choices ``choices[k]``:

* holds its kernel split by input channel at its ``mp`` levels and by output channel at its ``mp_out`` levels
  (replicated at ``dp`` levels); the local shards are plain tensors, and :meth:`HyparParallel.dtensor` gives each
  as a ``DTensor`` on the mesh (``Shard`` / ``Replicate``, the placements of :meth:`HyparPlan.placements`);
* takes its input in roles ``dp: B, mp: C, mp_out: R`` and produces its output in ``dp: B, mp: R, mp_out: C``;
* completes its output partial sums over its ``mp`` levels in the forward pass, its input-error partial sums over
  its ``mp_out`` levels in the backward pass, and its weight gradient over its ``dp`` levels after it.

A reduction over several levels is a reduce-scatter at each lower level, an all-reduce at the top one and an
all-gather back. A re-layout between layers changes one level at a time, top level first in the forward pass and
bottom level first in the backward pass, each step an exchange between the two partners of that level. These are
the exchanges :func:`~.cost.level_terms` charges; every one is an explicit point-to-point exchange, counted (elements
received, per layer, level and phase) in :attr:`HyparParallel.counter`. Where the paper's model charges a group
of accelerators once for data each of them needs (a re-layout at level ``k`` while layer ``l`` is ``mp`` at a
lower level), the execution moves more; :func:`~.cost.executed_terms` is the exact count, see docs/hypar.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .cost import BACKWARD, DP, FORWARD, GRADIENT, MP, MP_OUT, PARTIAL_SUM, PARTITION_NAMES, PHASES
from .plan import HyparPlan

BATCH, CHANNEL, REPLICATED = "B", "C", "R"
INPUT_ROLE = {DP: BATCH, MP: CHANNEL, MP_OUT: REPLICATED}     # a layer's input (and the error it produces)
OUTPUT_ROLE = {DP: BATCH, MP: REPLICATED, MP_OUT: CHANNEL}    # a layer's output (and the error it takes)

# modules run on the local tensors between weighted layers: they act per sample and per channel
LOCAL_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)


# ---------------------------------------------------------------------------------------------- the mesh
@dataclass
class CommCounter:
    """Elements this process received, ``terms[layer, level, phase]`` (phases of :data:`~.cost.PHASES`), plus
    ``output[level]``: gathering the last layer's output for the loss (outside the plan's model)."""

    terms: np.ndarray
    output: np.ndarray

    @classmethod
    def zeros(cls, layers: int, levels: int) -> CommCounter:
        return cls(np.zeros((layers, levels, len(PHASES))), np.zeros(levels))

    def reset(self) -> None:
        """Start counting from zero (e.g. after warm-up steps)."""
        self.terms[:] = 0
        self.output[:] = 0


class Mesh:
    """This process's place on the ``(2,) * levels`` mesh: its bit per level, its partner per level, and which
    blocks of a dimension it holds for given roles."""

    def __init__(self, rank: int, levels: int) -> None:
        self.rank, self.levels, self.world = rank, levels, 2**levels

    def bit(self, level: int, rank: int | None = None) -> int:
        return ((self.rank if rank is None else rank) >> (self.levels - 1 - level)) & 1

    def partner(self, level: int) -> int:
        return self.rank ^ (1 << (self.levels - 1 - level))

    def index(self, size: int, split_levels: Sequence[int], rank: int | None = None) -> torch.Tensor:
        """Global positions (ascending) this rank holds of a dimension of ``size`` split at ``split_levels``."""
        if not split_levels:
            return torch.arange(size)
        block = size // self.world
        keep = [b for b in range(self.world)
                if all(((b >> (self.levels - 1 - k)) & 1) == self.bit(k, rank) for k in split_levels)]
        return torch.cat([torch.arange(b * block, (b + 1) * block) for b in keep])

    def region(self, shape: Sequence[int], roles: Sequence[str], rank: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch positions, channel positions) held for a tensor of global ``shape`` in ``roles``."""
        return (self.index(shape[0], [k for k, r in enumerate(roles) if r == BATCH], rank),
                self.index(shape[1], [k for k, r in enumerate(roles) if r == CHANNEL], rank))


def _exchange(send: torch.Tensor, recv_shape: Sequence[int], peer: int) -> torch.Tensor:
    """Send ``send`` to ``peer`` and receive a tensor of ``recv_shape`` from it (both at once)."""
    buf = torch.empty(tuple(recv_shape), dtype=send.dtype)
    requests = [dist.isend(send.contiguous(), peer), dist.irecv(buf, peer)]
    for req in requests:
        req.wait()
    return buf


def _positions(of: torch.Tensor, within: torch.Tensor, size: int) -> torch.Tensor:
    """Where the global positions ``of`` sit in the (ascending) held positions ``within``."""
    lookup = torch.full((size,), -1, dtype=torch.long)
    lookup[within] = torch.arange(len(within))
    found = lookup[of]
    assert bool((found >= 0).all()), "layout bug: a position is not held"
    return found


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[~torch.isin(a, b)]


class _Comm:
    """The exchanges of one parallel model, counted into its :class:`CommCounter`."""

    def __init__(self, mesh: Mesh, counter: CommCounter) -> None:
        self.mesh, self.counter = mesh, counter

    def _count(self, layer: int | None, level: int, phase: int, elements: int) -> None:
        if layer is None:
            self.counter.output[level] += elements
        else:
            self.counter.terms[layer, level, phase] += elements

    def relayout(self, x: torch.Tensor, shape: Sequence[int], old: Sequence[str], new: Sequence[str],
                 top_down: bool, layer: int | None, phase: int) -> torch.Tensor:
        """``x`` (this rank's part, in roles ``old``, of a tensor of global ``shape``) in roles ``new``: one level
        at a time, top first when ``top_down``; every step is an exchange with that level's partner."""
        roles = list(old)
        order = range(self.mesh.levels) if top_down else reversed(range(self.mesh.levels))
        for k in order:
            if roles[k] == new[k]:
                continue
            after = roles.copy()
            after[k] = new[k]
            x = self._step(x, shape, roles, after, k, layer, phase)
            roles = after
        return x

    def _step(self, x: torch.Tensor, shape: Sequence[int], old: list[str], new: list[str], level: int,
              layer: int | None, phase: int) -> torch.Tensor:
        mesh, peer = self.mesh, self.mesh.partner(level)
        have_b, have_c = mesh.region(shape, old)
        need_b, need_c = mesh.region(shape, new)
        miss_b, miss_c = _difference(need_b, have_b), _difference(need_c, have_c)
        assert not (len(miss_b) and len(miss_c)), "a one-level step needs a rectangle"
        if len(miss_b) or len(miss_c):
            # what the partner needs from me: the same rule with its coordinates
            p_have_b, p_have_c = mesh.region(shape, old, peer)
            p_need_b, p_need_c = mesh.region(shape, new, peer)
            p_miss_b, p_miss_c = _difference(p_need_b, p_have_b), _difference(p_need_c, p_have_c)
            send_b = p_miss_b if len(p_miss_b) else p_need_b
            send_c = p_miss_c if len(p_miss_c) else p_need_c
            send = x[_positions(send_b, have_b, shape[0])][:, _positions(send_c, have_c, shape[1])]
            get_b = miss_b if len(miss_b) else need_b
            get_c = miss_c if len(miss_c) else need_c
            got = _exchange(send, (len(get_b), len(get_c), *x.shape[2:]), peer)
            self._count(layer, level, phase, got.numel())
        out = x.new_empty((len(need_b), len(need_c), *x.shape[2:]))
        keep_b, keep_c = need_b[torch.isin(need_b, have_b)], need_c[torch.isin(need_c, have_c)]
        if len(keep_b) and len(keep_c):
            out[_positions(keep_b, need_b, shape[0])[:, None], _positions(keep_c, need_c, shape[1])[None, :]] = \
                x[_positions(keep_b, have_b, shape[0])][:, _positions(keep_c, have_c, shape[1])]
        if len(miss_b) or len(miss_c):
            out[_positions(get_b, need_b, shape[0])[:, None], _positions(get_c, need_c, shape[1])[None, :]] = got
        return out

    def reduce(self, x: torch.Tensor, levels: Sequence[int], layer: int, phase: int) -> torch.Tensor:
        """The sum of ``x`` over the partners at ``levels``, on each of them: reduce-scatter at every level but the
        top one (bottom first), all-reduce at the top one, all-gather back."""
        if not levels:
            return x
        levels = sorted(levels)
        cur = x.reshape(-1).clone()
        gathered = []
        for k in reversed(levels[1:]):
            n, half, bit = cur.numel(), cur.numel() // 2, self.mesh.bit(k)
            mine, other = (cur[:half], cur[half:]) if bit == 0 else (cur[half:], cur[:half])
            got = _exchange(other, mine.shape, self.mesh.partner(k))
            self._count(layer, k, phase, got.numel())
            cur = mine + got
            gathered.append((k, n, bit))
        got = _exchange(cur, cur.shape, self.mesh.partner(levels[0]))
        self._count(layer, levels[0], phase, got.numel())
        cur = cur + got
        for k, n, bit in reversed(gathered):
            got = _exchange(cur, (n - cur.numel(),), self.mesh.partner(k))
            self._count(layer, k, phase, got.numel())
            cur = torch.cat([cur, got] if bit == 0 else [got, cur])
        return cur.view(x.shape)


class _Relayout(torch.autograd.Function):
    """Forward: re-lay out the tensor (top level first); backward: the error back (bottom level first)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: _Comm, shape: tuple[int, ...], old: tuple[str, ...],
                new: tuple[str, ...], layer: int | None) -> torch.Tensor:
        ctx.args = (comm, shape, old, new, layer)
        return comm.relayout(x, shape, old, new, True, layer, FORWARD)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        comm, shape, old, new, layer = ctx.args
        return (comm.relayout(grad.contiguous(), shape, new, old, False, layer, BACKWARD),
                None, None, None, None, None)


class _OutputPartialSum(torch.autograd.Function):
    """Forward: complete an ``mp`` layer's output partial sums; backward: the error is already complete on
    every partner (replicated tensors carry complete errors), so it passes through."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, comm: _Comm, levels: tuple[int, ...], layer: int) -> torch.Tensor:
        return comm.reduce(y, levels, layer, PARTIAL_SUM)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad, None, None, None


class _InputErrorPartialSum(torch.autograd.Function):
    """Forward: identity; backward: complete an ``mp_out`` layer's input-error partial sums."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: _Comm, levels: tuple[int, ...], layer: int) -> torch.Tensor:
        ctx.args = (comm, levels, layer)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        comm, levels, layer = ctx.args
        return comm.reduce(grad.contiguous(), levels, layer, PARTIAL_SUM), None, None, None


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class _Layer:
    """One weighted layer as laid out on this rank."""

    index: int
    name: str
    module: nn.Module                 # the original (full) module: its hyper-parameters
    choices: tuple[int, ...]
    weight: nn.Parameter              # local shard
    bias: nn.Parameter | None
    out_index: torch.Tensor           # global output channels held
    in_index: torch.Tensor            # global input channels held
    levels_of: dict[int, tuple[int, ...]] = field(default_factory=dict)   # choice -> levels with it

    @property
    def input_roles(self) -> tuple[str, ...]:
        return tuple(INPUT_ROLE[c] for c in self.choices)

    @property
    def output_roles(self) -> tuple[str, ...]:
        return tuple(OUTPUT_ROLE[c] for c in self.choices)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules of a (nested) ``nn.Sequential``, with their qualified names."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError("model", f"parallelize runs chains: an nn.Sequential (nested ones too) of Linear / Conv2d "
                                   f"and per-channel modules; got {type(model).__name__}")
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            out += [(f"{name}.{n}", m) for n, m in _chain(child)]
        else:
            out.append((name, child))
    return out


class HyparParallel(nn.Module):
    """A chain model laid out by a HyPar plan on this process's part of a ``(2,) * levels`` mesh.

    ``forward(x)`` takes the full batch (every process passes the same one), runs the layers on local shards and
    returns the full output (gathered, so any loss can follow). After ``loss.backward()`` call
    :meth:`reduce_gradients` (the ``dp`` weight-gradient exchange); then any optimizer can step the local shards.
    """

    def __init__(self, model: nn.Module, plan: HyparPlan, rank: int, counter: CommCounter) -> None:
        super().__init__()
        self.plan, self.mesh, self.counter = plan, Mesh(rank, plan.levels), counter
        self._comm = _Comm(self.mesh, counter)
        self._steps: list[tuple[str, Any]] = []
        self._layers: list[_Layer] = []
        self.shards = nn.ParameterDict()
        world = 2**plan.levels
        for name, module in _chain(model):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                i = len(self._layers)
                if i >= len(plan.layers):
                    raise ConfigError("plan", f"has {len(plan.layers)} weighted layers; the model has more")
                self._layers.append(self._shard(i, name, module, plan, world))
                self._steps.append(("layer", i))
            elif isinstance(module, nn.Dropout) and module.p == 0 or isinstance(module, LOCAL_MODULES):
                if isinstance(module, nn.Flatten) and module.start_dim != 1:
                    raise ConfigError(f"model.{name}", "parallelize needs Flatten(start_dim=1)")
                self._steps.append(("local", module))
            else:
                raise ConfigError(f"model.{name}", f"{type(module).__name__} cannot run on split tensors (it mixes "
                                                   f"samples or channels); allowed between weighted layers: "
                                                   f"{', '.join(m.__name__ for m in LOCAL_MODULES)}, Dropout(p=0)")
        if len(self._layers) != len(plan.layers):
            raise ConfigError("plan", f"has {len(plan.layers)} weighted layers; the model has {len(self._layers)}")

    def _shard(self, i: int, name: str, module: nn.Module, plan: HyparPlan, world: int) -> _Layer:
        spec = plan.layers[i]
        weight = module.weight.detach()
        kind = "conv" if isinstance(module, nn.Conv2d) else "fc"
        elems = weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        if spec.kind != kind or spec.weight_elems != elems:
            raise ConfigError(f"plan.layers[{i}]", f"is a {spec.kind} layer with {spec.weight_elems} weights; the "
                                                   f"model's layer {name!r} is {kind} with {elems}")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(f"model.{name}", f"grouped convolutions (groups={module.groups}) are not supported")
        choices = tuple(PARTITION_NAMES.index(c) for c in spec.choices)
        for dim, what, split in ((0, "output channels", MP_OUT), (1, "input channels", MP)):
            if split in choices and weight.shape[dim] % world:
                raise ConfigError(f"model.{name}", f"{what} ({weight.shape[dim]}) must be a multiple of the "
                                                   f"{world} accelerators")
        levels_of = {c: tuple(k for k, ck in enumerate(choices) if ck == c) for c in (DP, MP, MP_OUT)}
        out_index = self.mesh.index(weight.shape[0], levels_of[MP_OUT])
        in_index = self.mesh.index(weight.shape[1], levels_of[MP])
        key = f"l{i}"
        self.shards[f"{key}_weight"] = nn.Parameter(weight[out_index][:, in_index].clone())
        bias = None
        if module.bias is not None:
            self.shards[f"{key}_bias"] = bias = nn.Parameter(module.bias.detach()[out_index].clone())
        return _Layer(i, name, module, choices, self.shards[f"{key}_weight"], bias, out_index, in_index, levels_of)

    # ------------------------------------------------------------------------------------------ one step
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.mesh.world:
            raise ConfigError("batch", f"{x.shape[0]} samples do not split over {self.mesh.world} accelerators")
        roles: tuple[str, ...] = (REPLICATED,) * self.mesh.levels    # every process holds the whole input
        shape = tuple(x.shape)
        producer: int | None = None
        for kind, what in self._steps:
            if kind == "local":
                x = what(x)
                shape = (shape[0], *self._local_shape(what, shape, x))
                continue
            layer: _Layer = self._layers[what]
            if shape[1] != layer.module.weight.shape[1]:
                raise ConfigError(f"model.{layer.name}", f"gets {shape[1]} input channels; its weight has "
                                                         f"{layer.module.weight.shape[1]}")
            x = _Relayout.apply(x, self._comm, shape, roles, layer.input_roles, producer)
            if layer.levels_of[MP_OUT] and x.requires_grad:
                x = _InputErrorPartialSum.apply(x, self._comm, layer.levels_of[MP_OUT], layer.index)
            y = self._compute(layer, x)
            if layer.levels_of[MP]:
                y = _OutputPartialSum.apply(y, self._comm, layer.levels_of[MP], layer.index)
            if layer.bias is not None:
                y = y + layer.bias.view(1, -1, *([1] * (y.dim() - 2)))
            shape = (shape[0], layer.module.weight.shape[0], *y.shape[2:])
            x, roles, producer = y, layer.output_roles, layer.index
        return _Relayout.apply(x, self._comm, shape, roles, (REPLICATED,) * self.mesh.levels, None)

    @staticmethod
    def _local_shape(module: nn.Module, before: tuple[int, ...], local: torch.Tensor) -> tuple[int, ...]:
        """Global per-sample shape after a local module (channels scale with the local fraction)."""
        if isinstance(module, nn.Flatten):
            return (math.prod(before[1:]),)
        return (before[1], *local.shape[2:])

    @staticmethod
    def _compute(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        m = layer.module
        if isinstance(m, nn.Linear):
            return F.linear(x, layer.weight)
        return F.conv2d(x, layer.weight, None, m.stride, m.padding, m.dilation)

    def reduce_gradients(self) -> None:
        """Complete each ``dp`` layer's weight (and bias) gradient over its ``dp`` levels (after ``backward``)."""
        for layer in self._layers:
            if not layer.levels_of[DP] or layer.weight.grad is None:
                continue
            parts = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            flat = torch.cat([p.grad.reshape(-1) for p in parts])
            total = self._comm.reduce(flat, layer.levels_of[DP], layer.index, GRADIENT)
            start = 0
            for p in parts:
                p.grad.copy_(total[start:start + p.numel()].view_as(p))
                start += p.numel()

    # ------------------------------------------------------------------------------------------ views
    def dtensor(self, layer: int, what: str = "weight", grad: bool = False) -> Any:
        """Layer ``layer``'s local ``weight`` / ``bias`` (or its gradient) as a DTensor on the ``(2,) * levels``
        device mesh: ``Shard(1)`` at ``mp`` levels, ``Shard(0)`` at ``mp_out`` levels, ``Replicate()`` at ``dp``
        levels. Its global tensor has the blocks of each split dimension in mesh order (see :meth:`full`)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not hasattr(self, "_device_mesh"):
            self._device_mesh = init_device_mesh("cpu", (2,) * self.mesh.levels,
                                                 mesh_dim_names=tuple(f"level{k}" for k in range(self.mesh.levels)))
        entry = self._layers[layer]
        tensor = entry.weight if what == "weight" else entry.bias
        local = tensor.grad if grad else tensor.detach()
        placements = [Shard(0) if c == MP_OUT else Shard(1) if c == MP and what == "weight" else Replicate()
                      for c in entry.choices]
        return DTensor.from_local(local, self._device_mesh, placements, run_check=False)

    def full(self, layer: int, what: str = "weight", grad: bool = False) -> torch.Tensor:
        """Layer ``layer``'s whole ``weight`` / ``bias`` (or gradient), gathered from the shards through DTensor
        (a collective: every process calls it)."""
        entry = self._layers[layer]
        quiet = logging.getLogger("torch.distributed.tensor._redistribute")
        level, quiet.level = quiet.level, logging.ERROR   # it suggests flattening the mesh: not our layout
        try:
            gathered = self.dtensor(layer, what, grad).full_tensor()
        finally:
            quiet.level = level
        dims = [(0, entry.levels_of[MP_OUT])] + ([(1, entry.levels_of[MP])] if what == "weight" else [])
        for dim, levels in dims:
            gathered = gathered.index_select(dim, torch.argsort(self._mesh_order(gathered.shape[dim], levels)))
        return gathered

    def _mesh_order(self, size: int, levels: tuple[int, ...]) -> torch.Tensor:
        """Global positions in the order DTensor lays the shards out (mesh coordinates of ``levels``, top first)."""
        order = []
        for coords in range(2 ** len(levels)):
            bits = {k: (coords >> (len(levels) - 1 - j)) & 1 for j, k in enumerate(levels)}
            rank = sum(bits.get(k, 0) << (self.mesh.levels - 1 - k) for k in range(self.mesh.levels))
            order.append(self.mesh.index(size, levels, rank))
        return torch.cat(order)

    def received(self) -> CommCounter:
        """Elements received by all processes together (a collective: every process calls it)."""
        both = torch.from_numpy(np.concatenate([self.counter.terms.ravel(), self.counter.output]))
        dist.all_reduce(both)
        n = self.counter.terms.size
        return CommCounter(both[:n].numpy().reshape(self.counter.terms.shape), both[n:].numpy())


def parallelize(model: nn.Module, plan: HyparPlan, rank: int | None = None) -> HyparParallel:
    """Lay out ``model`` (a chain: ``nn.Sequential`` of Linear / Conv2d and per-channel modules, the model the plan
    was made for) on this process's part of the plan's ``(2,) * levels`` mesh. Needs the default process group with
    ``plan.accelerators`` processes (e.g. ``torchrun --nproc-per-node 4`` or :func:`compresskit.distributed.local.
    run_local`); every process passes the same model and plan."""
    if rank is None:
        if not dist.is_initialized():
            raise ConfigError("parallelize", "needs torch.distributed initialised (init_process_group) with "
                                             f"{plan.accelerators} processes")
        if dist.get_world_size() != plan.accelerators:
            raise ConfigError("plan.accelerators", f"is {plan.accelerators}; this run has {dist.get_world_size()} "
                                                   f"processes")
        rank = dist.get_rank()
    return HyparParallel(model, plan, rank, CommCounter.zeros(len(plan.layers), plan.levels))


def train_step(parallel: HyparParallel, x: torch.Tensor, target: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """One training step of the parallel model: forward, loss, backward, the ``dp`` gradient exchange and (when
    given) the optimizer step on the local shards. Returns the loss (the same on every process)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(parallel(x), target)
    loss.backward()
    parallel.reduce_gradients()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()
