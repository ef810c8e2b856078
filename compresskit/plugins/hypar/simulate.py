"""A two-worker simulator that really splits the tensors of an MLP and counts the elements that cross.

Each worker holds full-shape buffers plus masks of which elements it holds *complete* and which only as a *partial
sum*. Before a computation a worker fetches what it needs but lacks: a complete copy from its partner, or the
partner's partial sum to add to its own. Every fetched element is counted. The computation itself uses only local
data, and the assembled outputs and weight gradients are returned so they can be checked against autograd.
This checks the communication model in :mod:`cost` (one split) from the tensors up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Held:
    value: torch.Tensor
    complete: torch.Tensor
    partial: torch.Tensor


@dataclass
class SimulationResult:
    """Elements moved by phase, plus the output and weight gradients assembled from the workers."""

    forward: int = 0
    backward: int = 0
    intra: int = 0
    per_boundary: dict[int, int] = field(default_factory=dict)
    output: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.intra


class TwoWorkerMLP:
    """Bias-free MLP ``relu(x W_0^T) ... W_{L-1}^T`` trained with loss ``0.5 * ||out - target||^2`` on 2 workers."""

    def __init__(self, weights: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> None:
        self.weights, self.x, self.target = weights, x, target
        self.batch = x.shape[0]
        if self.batch % 2 or any(w.shape[0] % 2 for w in weights):
            raise ValueError("batch and every layer's output width must be even")

    def _rows(self, w: int) -> slice:
        half = self.batch // 2
        return slice(w * half, (w + 1) * half)

    @staticmethod
    def _cols(width: int, w: int) -> slice:
        half = width // 2
        return slice(w * half, (w + 1) * half)

    def _fetch(self, store: list[dict[str, _Held]], w: int, name: str, need: torch.Tensor) -> int:
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

    @staticmethod
    def _empty(shape) -> _Held:
        return _Held(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool))

    def run(self, choices: list[str]) -> SimulationResult:
        """Forward and backward with per-layer 'dp'/'mp' choices; returns counted elements and the results."""
        n = len(self.weights)
        res = SimulationResult()
        store: list[dict[str, _Held]] = [{}, {}]
        widths = [self.x.shape[1]] + [w.shape[0] for w in self.weights]
        for w in range(2):
            store[w]["F0"] = _Held(self.x.clone(), torch.zeros_like(self.x, dtype=torch.bool),
                                   torch.zeros_like(self.x, dtype=torch.bool))
        pre: list[list[torch.Tensor]] = [[None] * n, [None] * n]  # type: ignore[list-item]
        # ---------------------------------------------------------------------------------------- forward
        for l, (weight, choice) in enumerate(zip(self.weights, choices)):
            shape_out = (self.batch, widths[l + 1])
            for w in range(2):
                store[w][f"F{l + 1}"] = self._empty(shape_out)
            for w in range(2):
                rows = self._rows(w) if choice == "dp" else slice(None)
                cols = slice(None) if choice == "dp" else self._cols(widths[l + 1], w)
                need = torch.zeros(self.batch, widths[l], dtype=torch.bool)
                need[rows] = True
                if l == 0:  # input data is loaded by each worker directly
                    store[w]["F0"].complete |= need
                else:
                    moved = self._fetch(store, w, f"F{l}", need)
                    res.forward += moved
                    res.per_boundary[l] = res.per_boundary.get(l, 0) + moved
                z = store[w][f"F{l}"].value[rows] @ weight[cols].t()
                pre[w][l] = z
                out = store[w][f"F{l + 1}"]
                out.value[rows, cols] = torch.relu(z) if l < n - 1 else z
                out.complete[rows, cols] = True
        # ---------------------------------------------------------------------------------------- loss
        output = torch.zeros(self.batch, widths[-1])
        for w in range(2):
            held = store[w][f"F{n}"]
            output[held.complete] = held.value[held.complete]
            err = self._empty((self.batch, widths[-1]))
            err.value[held.complete] = held.value[held.complete] - self.target[held.complete]
            err.complete = held.complete.clone()
            store[w][f"E{n}"] = err
        res.output = output
        # ---------------------------------------------------------------------------------------- backward
        grads: list[torch.Tensor] = [torch.zeros_like(wt) for wt in self.weights]
        for l in range(n - 1, -1, -1):
            weight, choice = self.weights[l], choices[l]
            for w in range(2):
                store[w][f"dW{l}"] = self._empty(tuple(weight.shape))
                if l > 0:
                    store[w][f"E{l}"] = self._empty((self.batch, widths[l]))
            for w in range(2):
                rows = self._rows(w) if choice == "dp" else slice(None)
                cols = slice(None) if choice == "dp" else self._cols(widths[l + 1], w)
                need = torch.zeros(self.batch, widths[l + 1], dtype=torch.bool)
                need[rows, cols] = True
                moved = self._fetch(store, w, f"E{l + 1}", need)
                res.backward += moved
                res.per_boundary[l + 1] = res.per_boundary.get(l + 1, 0) + moved
                dz = store[w][f"E{l + 1}"].value[rows, cols]
                if l < n - 1:
                    dz = dz * (pre[w][l] > 0)
                f_in = store[w][f"F{l}"].value[rows]
                dw = store[w][f"dW{l}"]
                if choice == "dp":      # partial over this worker's half batch
                    dw.value[:] = dz.t() @ f_in
                    dw.partial[:] = True
                else:                   # complete for this worker's output channels
                    dw.value[cols] = dz.t() @ f_in
                    dw.complete[cols] = True
                if l > 0:
                    err = store[w][f"E{l}"]
                    if choice == "dp":
                        err.value[rows] = dz @ weight
                        err.complete[rows] = True
                    else:
                        err.value[:] = dz @ weight[cols]
                        err.partial[:] = True
            if choice == "dp":          # both replicas need the summed gradient
                for w in range(2):
                    res.intra += self._fetch(store, w, f"dW{l}", torch.ones(weight.shape, dtype=torch.bool))
            for w in range(2):
                held = store[w][f"dW{l}"]
                grads[l][held.complete] = held.value[held.complete]
        res.grads = grads
        return res


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
