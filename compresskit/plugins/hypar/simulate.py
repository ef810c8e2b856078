"""A two-worker simulator that really splits the tensors of an MLP and counts the elements that cross.

Each worker holds full-shape buffers plus masks of which elements it holds *complete* and which only as a *partial
sum*. Before a computation a worker fetches what it needs but lacks: a complete copy from its partner, or the
partner's partial sum to add to its own. Every fetched element is counted, per layer and phase, the way
:func:`~.cost.level_terms` charges it. The computation itself uses only local data, and the assembled outputs and
weight gradients are returned so they can be checked against autograd. This checks the communication model in
:mod:`cost` (one split, every partition type) from the tensors up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cost import BACKWARD, FORWARD, GRADIENT, PARTIAL_SUM, PHASES


@dataclass
class _Held:
    value: torch.Tensor
    complete: torch.Tensor
    partial: torch.Tensor


@dataclass
class SimulationResult:
    """Elements fetched (both workers) per layer and phase, plus the output and weight gradients assembled from
    the workers. ``terms[l, p]`` is charged like ``level_terms(...)[l, 0, p]``: layer ``l``'s own exchange
    (gradient, partial sums) and the forward / backward transition between ``l`` and ``l + 1``."""

    terms: np.ndarray
    output: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        """All fetched elements."""
        return int(self.terms.sum())


class TwoWorkerMLP:
    """Bias-free MLP ``relu(x W_0^T) ... W_{L-1}^T`` trained with loss ``0.5 * ||out - target||^2`` on 2 workers,
    each layer ``dp`` (batch split), ``mp`` (kernel split by input channel) or ``mp_out`` (by output channel)."""

    def __init__(self, weights: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> None:
        self.weights, self.x, self.target = weights, x, target
        self.batch = x.shape[0]
        if self.batch % 2 or x.shape[1] % 2 or any(w.shape[0] % 2 for w in weights):
            raise ValueError("batch, input width and every layer's output width must be even")

    def _rows(self, w: int) -> slice:
        half = self.batch // 2
        return slice(w * half, (w + 1) * half)

    @staticmethod
    def _cols(width: int, w: int) -> slice:
        half = width // 2
        return slice(w * half, (w + 1) * half)

    @staticmethod
    def _fetch(store: list[dict[str, _Held]], w: int, name: str, need: torch.Tensor) -> int:
        mine, other = store[w][name], store[1 - w][name]
        missing = need & ~mine.complete
        if not missing.any():
            return 0
        copy = missing & other.complete
        add = missing & ~other.complete & other.partial & mine.partial
        if not bool((copy | add).eq(missing).all()):
            raise RuntimeError(f"worker {w} cannot obtain all of {name}: layout bug")
        mine.value[copy] = other.value[copy]
        mine.value[add] = mine.value[add] + other.value[add]
        mine.complete |= missing
        mine.partial &= ~missing
        return int(missing.sum())

    def _fetch_both(self, store: list[dict[str, _Held]], name: str, needs: list[torch.Tensor]) -> int:
        """Both workers fetch at once (a partner's partial sums are read before either adds them)."""
        snapshot = [{name: _Held(h.value.clone(), h.complete.clone(), h.partial.clone())} for h in
                    (store[0][name], store[1][name])]
        moved = 0
        for w in range(2):
            view = [snapshot[0], snapshot[1]]
            view[w] = {name: store[w][name]}
            moved += self._fetch(view, w, name, needs[w])
        return moved

    @staticmethod
    def _local(held: _Held, rows: slice, cols: slice, what: str) -> torch.Tensor:
        """The block ``[rows, cols]`` of a worker's own buffer, which it must hold complete (no hidden reads)."""
        if not bool(held.complete[rows, cols].all()):
            raise RuntimeError(f"computation reads {what} that the worker does not hold complete: layout bug")
        return held.value[rows, cols]

    @staticmethod
    def _empty(shape) -> _Held:
        return _Held(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool))

    def _mask(self, shape: tuple[int, int], rows: slice, cols: slice) -> torch.Tensor:
        m = torch.zeros(shape, dtype=torch.bool)
        m[rows, cols] = True
        return m

    def _in_slices(self, choice: str, width: int, w: int) -> tuple[slice, slice]:
        """Rows and columns of a layer's input (forward) a worker computes with."""
        if choice == "dp":
            return self._rows(w), slice(None)
        if choice == "mp":
            return slice(None), self._cols(width, w)
        return slice(None), slice(None)

    def _out_slices(self, choice: str, width: int, w: int) -> tuple[slice, slice]:
        """Rows and columns of a layer's output (and of its error) a worker computes with."""
        if choice == "dp":
            return self._rows(w), slice(None)
        if choice == "mp":
            return slice(None), slice(None)
        return slice(None), self._cols(width, w)

    def run(self, choices: list[str]) -> SimulationResult:
        """Forward and backward with per-layer 'dp' / 'mp' / 'mp_out' choices; returns counted elements and the
        results."""
        n = len(self.weights)
        terms = np.zeros((n, len(PHASES)), dtype=np.int64)
        store: list[dict[str, _Held]] = [{}, {}]
        widths = [self.x.shape[1]] + [w.shape[0] for w in self.weights]
        for w in range(2):   # the input is loaded by each worker as it needs it
            store[w]["F0"] = _Held(self.x.clone(), torch.ones_like(self.x, dtype=torch.bool),
                                   torch.zeros_like(self.x, dtype=torch.bool))
        # ---------------------------------------------------------------------------------------- forward
        for l, (weight, choice) in enumerate(zip(self.weights, choices)):
            shape_in, shape_out = (self.batch, widths[l]), (self.batch, widths[l + 1])
            if l > 0:
                needs = [self._mask(shape_in, *self._in_slices(choice, widths[l], w)) for w in range(2)]
                terms[l - 1, FORWARD] += sum(self._fetch(store, w, f"F{l}", needs[w]) for w in range(2))
            for w in range(2):
                store[w][f"O{l}"] = self._empty(shape_out)
            for w in range(2):
                rows, cols = self._in_slices(choice, widths[l], w)
                out = store[w][f"O{l}"]
                f_in = self._local(store[w][f"F{l}"], rows, cols, f"F{l}")
                if choice == "dp":        # this worker's batch half, complete
                    out.value[rows] = f_in @ weight.t()
                    out.complete[rows] = True
                elif choice == "mp":      # partial sums of the whole output (this worker's input channels)
                    out.value[:] = f_in @ weight[:, cols].t()
                    out.partial[:] = True
                else:                     # this worker's output channels, whole batch, complete
                    oc = self._cols(widths[l + 1], w)
                    out.value[:, oc] = f_in @ weight[oc].t()
                    out.complete[:, oc] = True
            if choice == "mp":
                terms[l, PARTIAL_SUM] += self._fetch_both(store, f"O{l}", [torch.ones(shape_out, dtype=torch.bool)] * 2)
            for w in range(2):
                o = store[w][f"O{l}"]
                act = torch.relu(o.value) if l < n - 1 else o.value.clone()
                store[w][f"F{l + 1}"] = _Held(act * o.complete, o.complete.clone(),
                                              torch.zeros(shape_out, dtype=torch.bool))
        # ---------------------------------------------------------------------------------------- loss
        output = torch.zeros(self.batch, widths[-1])
        if not bool((store[0][f"F{n}"].complete | store[1][f"F{n}"].complete).all()):
            raise RuntimeError("the workers do not hold the whole output between them: layout bug")
        for w in range(2):
            held = store[w][f"F{n}"]
            output[held.complete] = held.value[held.complete]
            err = self._empty((self.batch, widths[-1]))
            err.value[held.complete] = held.value[held.complete] - self.target[held.complete]
            err.complete = held.complete.clone()
            store[w][f"E{n}"] = err
        # ---------------------------------------------------------------------------------------- backward
        grads: list[torch.Tensor] = [torch.zeros_like(wt) for wt in self.weights]
        for l in range(n - 1, -1, -1):
            weight, choice = self.weights[l], choices[l]
            shape_out = (self.batch, widths[l + 1])
            needs = [self._mask(shape_out, *self._out_slices(choice, widths[l + 1], w)) for w in range(2)]
            moved = sum(self._fetch(store, w, f"E{l + 1}", needs[w]) for w in range(2))
            if l < n - 1:
                terms[l, BACKWARD] += moved
            elif moved:
                raise RuntimeError("the loss error is computed where the output lies: nothing to fetch")
            for w in range(2):
                store[w][f"dW{l}"] = self._empty(tuple(weight.shape))
                if l > 0:
                    store[w][f"E{l}"] = self._empty((self.batch, widths[l]))
            for w in range(2):
                rows, cols = self._out_slices(choice, widths[l + 1], w)
                dz = self._local(store[w][f"E{l + 1}"], rows, cols, f"E{l + 1}")
                if l < n - 1:             # ReLU mask from the pre-activation, where the error is used
                    dz = dz * (self._local(store[w][f"O{l}"], rows, cols, f"O{l}") > 0)
                f_rows, f_cols = self._in_slices(choice, widths[l], w)
                f_in = self._local(store[w][f"F{l}"], f_rows, f_cols, f"F{l}")
                dw = store[w][f"dW{l}"]
                if choice == "dp":        # partial over this worker's half batch
                    dw.value[:] = dz.t() @ f_in
                    dw.partial[:] = True
                elif choice == "mp":      # complete for this worker's input channels
                    ic = self._cols(widths[l], w)
                    dw.value[:, ic] = dz.t() @ f_in
                    dw.complete[:, ic] = True
                else:                     # complete for this worker's output channels
                    dw.value[cols] = dz.t() @ f_in
                    dw.complete[cols] = True
                if l > 0:
                    err = store[w][f"E{l}"]
                    if choice == "dp":
                        err.value[rows] = dz @ weight
                        err.complete[rows] = True
                    elif choice == "mp":
                        ic = self._cols(widths[l], w)
                        err.value[:, ic] = dz @ weight[:, ic]
                        err.complete[:, ic] = True
                    else:                 # partial sums of the whole input error
                        err.value[:] = dz @ weight[cols]
                        err.partial[:] = True
            if choice == "dp":            # both replicas need the summed gradient
                terms[l, GRADIENT] += self._fetch_both(store, f"dW{l}", [torch.ones(weight.shape, dtype=torch.bool)] * 2)
            if choice == "mp_out" and l > 0:
                terms[l, PARTIAL_SUM] += self._fetch_both(store, f"E{l}",
                                                          [torch.ones((self.batch, widths[l]), dtype=torch.bool)] * 2)
            if not bool((store[0][f"dW{l}"].complete | store[1][f"dW{l}"].complete).all()):
                raise RuntimeError(f"the workers do not hold the whole gradient of layer {l}: layout bug")
            for w in range(2):
                held = store[w][f"dW{l}"]
                grads[l][held.complete] = held.value[held.complete]
        return SimulationResult(terms, output, grads)


def reference(weights: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same network on one device with autograd: (output, weight gradients)."""
    ws = [w.clone().requires_grad_(True) for w in weights]
    h = x
    for i, w in enumerate(ws):
        h = h @ w.t()
        if i < len(ws) - 1:
            h = torch.relu(h)
    (0.5 * ((h - target) ** 2).sum()).backward()
    return h.detach(), [w.grad for w in ws]
