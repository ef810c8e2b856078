"""Peers for embedding-training benchmarks: the strongest thing a user would run instead of compresskit.

* FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` (TBE) on CPU: all tables in one module, optimizer fused
  into backward (no torch optimizer; the update happens inside ``loss.backward()``).
* ``nn.EmbeddingBag(sparse=True)`` per table with ``torch.optim.SGD`` / ``torch.optim.Adagrad``.
* For quantized lookups: FBGEMM's inference TBE, ``IntNBitTableBatchedEmbeddingBagsCodegen`` (INT8 rows with a
  per-row FP16 scale and bias), the CPU kernel served models use.

FBGEMM 1.8.0 CPU update semantics (``codegen/genscript/optimizers.py``, ``split_weight_update_cpu``). Gradients
are first summed per unique row over every occurrence in the batch (duplicates within and across bags); then,
per touched row with summed gradient ``g`` (untouched rows and their state are left alone):

* ``EXACT_SGD``:             ``w -= lr * g``
* ``EXACT_ADAGRAD``:         ``s += g*g`` (per element); ``w -= lr * g / (sqrt(s) + eps)``
* ``EXACT_ROWWISE_ADAGRAD``: ``m += sum(g*g) / D`` (one float per row); ``w -= lr * g / (sqrt(m) + eps)``

``eps`` defaults to 1e-8 (torch Adagrad's default is 1e-10) and sits outside the square root in both Adagrads;
state starts at 0. Rowwise weight decay / ``max_norm`` are off by default and not used here. ``python
benchmarks/peers.py`` checks all of this against hand-written updates (with eps=0.1, so its placement shows).
TBE's CPU kernels use ``at::parallel_for`` (torch's intra-op threads); bounds checking is FBGEMM's default (WARNING).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compresskit.models.dlrm import mlp

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def tbe_available() -> bool:
    """True when FBGEMM's training TBE imports (never raises)."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: F401
            SplitTableBatchedEmbeddingBagsCodegen)
        return True
    except Exception:  # ImportError, or OSError from a .so that does not load
        return False


def int8_tbe_available() -> bool:
    """True when FBGEMM's quantized inference TBE imports (never raises)."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (  # noqa: F401
            IntNBitTableBatchedEmbeddingBagsCodegen)
        return True
    except Exception:
        return False


def make_int8_tbe(tables: list[tuple[int, int]]) -> nn.Module:
    """FBGEMM's CPU inference TBE over ``tables`` = [(rows, dim)], INT8 rows (random values: for timing);
    ``forward(indices, offsets)`` as :func:`tbe_inputs` builds them."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(f"t{i}", rows, dim, SparseType.INT8, EmbeddingLocation.HOST)
                         for i, (rows, dim) in enumerate(tables)], device="cpu")
    tbe.fill_random_weights()
    return tbe


def make_tbe(tables: list[tuple[int, int]], optimizer: str, lr: float, eps: float = 1e-8,
             weights: list[torch.Tensor] | None = None, pooling: str = "sum") -> nn.Module:
    """One CPU TBE (fp32, host memory) over ``tables`` = [(rows, dim)], with a fused exact optimizer.

    ``forward(indices, offsets)`` (see :func:`tbe_inputs`) returns ``[B, sum(dims)]``, tables concatenated.
    ``weights[t]`` (``[rows, dim]``) is copied in as table ``t``'s initial weights when given.
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    optim = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    if optimizer not in optim:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in tables],
        optimizer=optim[optimizer], learning_rate=lr, eps=eps,
        weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
        pooling_mode={"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}[pooling], device="cpu")
    if weights is not None:
        with torch.no_grad():
            for dst, src in zip(tbe.split_embedding_weights(), weights, strict=True):
                dst.copy_(src)  # split_embedding_weights() are views into the flat host buffer
    return tbe


def tbe_inputs(ids_per_table: list[torch.Tensor],
               offsets_per_table: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.EmbeddingBag-style inputs (per table: 1-D ids and B start offsets, no final offset) -> TBE's
    ``(indices, offsets)``: ids concatenated table-major, offsets of length ``T*B + 1`` ending at ``len(indices)``."""
    batch = {int(o.numel()) for o in offsets_per_table}
    if len(batch) != 1:
        raise ValueError(f"every table needs the same number of bags, got {sorted(batch)}")
    indices = torch.cat([ids.long() for ids in ids_per_table])
    parts, start = [], 0
    for ids, offs in zip(ids_per_table, offsets_per_table, strict=True):
        parts.append(offs.long() + start)
        start += ids.numel()
    parts.append(torch.tensor([start], dtype=torch.long))
    return indices, torch.cat(parts)


class SparseBagPeer(nn.Module):
    """One ``nn.EmbeddingBag(sparse=True)`` per table plus torch's sparse-gradient SGD or Adagrad."""

    def __init__(self, tables: list[tuple[int, int]], optimizer: str, lr: float, eps: float = 1e-8,
                 weights: list[torch.Tensor] | None = None, pooling: str = "sum") -> None:
        super().__init__()
        if optimizer == "rowwise_adagrad":
            raise ValueError("rowwise_adagrad has no torch.optim counterpart; use make_tbe() for it")
        self.bags = nn.ModuleList(nn.EmbeddingBag(r, d, mode=pooling, sparse=True) for r, d in tables)
        if weights is not None:
            with torch.no_grad():
                for bag, w in zip(self.bags, weights, strict=True):
                    bag.weight.copy_(w)
        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=lr)
        elif optimizer == "adagrad":
            self.optimizer = torch.optim.Adagrad(self.parameters(), lr=lr, eps=eps)
        else:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")

    def forward(self, ids_per_table: list[torch.Tensor], offsets_per_table: list[torch.Tensor]) -> torch.Tensor:
        """Pooled ``[B, sum(dims)]``, tables concatenated like TBE's output."""
        return torch.cat([bag(i, o) for bag, i, o in zip(self.bags, ids_per_table, offsets_per_table)], dim=1)

    def step(self, ids_per_table: list[torch.Tensor], offsets_per_table: list[torch.Tensor],
             loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One training step: forward, ``loss_fn(pooled)`` -> scalar, backward, optimizer step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self(ids_per_table, offsets_per_table))
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class DLRMOnTBE(nn.Module):
    """``compresskit.models.dlrm.DLRM``'s architecture with every table in one TBE (fused optimizer).

    Only the MLPs are trained by the caller's torch optimizer: pass it :meth:`dense_parameters`, not
    ``parameters()`` (which also lists TBE's ``weights_host`` / ``momentum1_host`` buffers-as-Parameters).
    """

    def __init__(self, num_dense: int, cardinalities: list[int], embedding_dim: int = 16,
                 bottom_mlp: list[int] | None = None, top_mlp: list[int] | None = None,
                 optimizer: str = "sgd", lr: float = 0.01, eps: float = 1e-8,
                 weights: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        if weights is None:  # DLRM's init: U(-rows^-0.5, rows^-0.5) per table
            weights = [torch.empty(c, embedding_dim).uniform_(-c ** -0.5, c ** -0.5) for c in cardinalities]
        self.embedding_dim = embedding_dim
        bottom = [num_dense, *(bottom_mlp or [64]), embedding_dim]
        self.bottom = mlp(bottom, final_activation=True) if num_dense else None
        self.tbe = make_tbe([(c, embedding_dim) for c in cardinalities], optimizer, lr, eps, weights)
        n = len(cardinalities) + (1 if num_dense else 0)
        self._tri = torch.triu_indices(n, n, offset=1)
        self.top = mlp([n * (n - 1) // 2 + (embedding_dim if num_dense else 0), *(top_mlp or [64]), 1],
                       final_activation=False)

    def dense_parameters(self) -> list[nn.Parameter]:
        """The MLP parameters, for the caller's torch optimizer."""
        mods = [m for m in (self.bottom, self.top) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``dense [B, num_dense]``, ``sparse [B, T]`` int64 (one id per feature) -> logits ``[B]``."""
        batch, tables = sparse.shape
        indices = sparse.t().contiguous().view(-1).long()  # table-major, one id per bag
        offsets = torch.arange(batch * tables + 1, dtype=torch.long, device=sparse.device)
        t = self.tbe(indices, offsets).view(batch, tables, self.embedding_dim)
        if self.bottom is not None:
            x = self.bottom(dense)
            t = torch.cat([x.unsqueeze(1), t], dim=1)     # [B, n, d]
        inter = torch.bmm(t, t.transpose(1, 2))[:, self._tri[0], self._tri[1]]
        z = torch.cat([x, inter], dim=1) if self.bottom is not None else inter
        return self.top(z).squeeze(-1)


def _reference_update(w: torch.Tensor, g: torch.Tensor, optimizer: str, lr: float, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hand-written first update from zero state, ``g`` already summed per row; returns (weights, state)."""
    if optimizer == "sgd":
        return w - lr * g, None
    state = g * g if optimizer == "adagrad" else (g * g).mean(dim=1)
    denom = state.sqrt() + eps
    return w - lr * g / (denom if optimizer == "adagrad" else denom[:, None]), state


if __name__ == "__main__":
    import torch.nn.functional as F
    if not tbe_available():
        raise SystemExit("fbgemm_gpu is not importable")
    torch.manual_seed(0)
    T, rows, dim, B, pool, lr = 3, 50, 8, 16, 3, 0.1
    eps = 0.1  # large, so sqrt(s) + eps vs sqrt(s + eps) (or sqrt(s + eps^2)) would show
    tables = [(rows, dim)] * T
    # ids from a small range so rows repeat within and across bags; bag 0 of each table is [7, 7, 7]
    ids = [torch.cat([torch.full((pool,), 7), torch.randint(0, 12, ((B - 1) * pool,))]) for _ in range(T)]
    offs = [torch.arange(0, B * pool, pool) for _ in range(T)]
    indices, offsets = tbe_inputs(ids, offs)
    w0 = [torch.randn(rows, dim) for _ in range(T)]
    grad_out = torch.randn(B, T * dim)
    for opt in OPTIMIZERS:
        tbe = make_tbe(tables, opt, lr, eps, weights=w0)
        out = tbe(indices, offsets)
        ref = torch.cat([F.embedding_bag(i, w, o, mode="sum") for i, w, o in zip(ids, w0, offs)], dim=1)
        fwd_err = (out - ref).abs().max().item()
        out.backward(grad_out)  # fused: the update happens here
        states = tbe.split_optimizer_states() if opt != "sgd" else [None] * T
        upd_err = state_err = 0.0
        for t in range(T):
            g = torch.zeros(rows, dim, dtype=torch.float64)  # per-row sum over every occurrence
            g.index_add_(0, ids[t], grad_out[:, t * dim:(t + 1) * dim].double().repeat_interleave(pool, dim=0))
            w_ref, s_ref = _reference_update(w0[t].double(), g, opt, lr, eps)
            upd_err = max(upd_err, (tbe.split_embedding_weights()[t].double() - w_ref).abs().max().item())
            if s_ref is not None:
                rel = (states[t][0].double().view_as(s_ref) - s_ref).abs() / s_ref.clamp(min=1.0)
                state_err = max(state_err, rel.max().item())  # state ~ g^2 can be large: relative
        peer_err = float("nan")
        if opt != "rowwise_adagrad":  # torch peer, same weights and upstream gradient
            peer = SparseBagPeer(tables, opt, lr, eps, weights=w0)
            peer.step(ids, offs, lambda pooled: (pooled * grad_out).sum())
            peer_err = max((b.weight - w).abs().max().item() for b, w in zip(peer.bags, tbe.split_embedding_weights()))
        ok = fwd_err < 1e-6 and upd_err < 1e-6 and state_err < 1e-5 and not peer_err > 1e-6
        print(f"{opt:16s} forward {fwd_err:.1e}  update {upd_err:.1e}  state(rel) {state_err:.1e}  "
              f"torch-peer {peer_err:.1e}  {'OK' if ok else 'MISMATCH'}")
        assert ok, opt
    # DLRMOnTBE with DLRM's weights computes DLRM's logits
    from compresskit.models.dlrm import DLRM
    ref_model = DLRM(13, [rows] * T, dim, [16], [16])
    model = DLRMOnTBE(13, [rows] * T, dim, [16], [16], weights=[e.weight.detach() for e in ref_model.embeddings])
    model.bottom.load_state_dict(ref_model.bottom.state_dict())
    model.top.load_state_dict(ref_model.top.state_dict())
    dense, sparse = torch.randn(B, 13), torch.randint(0, rows, (B, T))
    err = (model(dense, sparse) - ref_model(dense, sparse)).abs().max().item()
    print(f"DLRMOnTBE vs DLRM logits {err:.1e}  {'OK' if err < 1e-5 else 'MISMATCH'}")
    assert err < 1e-5
