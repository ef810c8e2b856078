"""FIITED inside your own training loop, Lightning style: a module with ``training_step`` and
``configure_optimizers``, a plain DataLoader, a custom loss, AdamW and gradient accumulation.

The compression handle from ``compresskit.prepare`` needs three calls from the loop: ``after_backward()`` once the
gradients of a step are complete, ``step()`` after ``optimizer.step()`` and ``finalize()`` at the end. In
PyTorch Lightning those are a Callback's ``on_before_optimizer_step`` / ``on_train_batch_end`` (when
``trainer.global_step > compression.steps``: it runs for every micro-batch) / ``on_fit_end``.

    python examples/own_training_loop.py [--steps N] [path/to/ml-100k]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import compresskit
from compresskit.data.movielens import load_movielens
from compresskit.data.synthetic_ctr import load_synthetic_ctr
from compresskit.metrics import roc_auc
from compresskit.models.dlrm import DLRM
from compresskit.plugins.fiited import FiitedConfig


class ClickModel(nn.Module):
    """A LightningModule-shaped wrapper: the network, its loss and its optimizer."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: list[torch.Tensor]) -> torch.Tensor:
        *inputs, label = batch
        logits = self.net(*inputs)
        positives = label.float().mean().clamp(0.05, 0.95)   # a custom loss: classes balanced per batch
        weight = torch.where(label > 0, 0.5 / positives, 0.5 / (1 - positives))
        return F.binary_cross_entropy_with_logits(logits, label.float(), weight=weight)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


def fit(module: ClickModel, loader: DataLoader, steps: int, accumulate: int = 2) -> compresskit.Compression:
    """A minimal trainer: what Lightning's fit loop does, with the compression handle's three calls."""
    compression = compresskit.prepare(module.net, FiitedConfig(target_memory_ratio=0.1, chunk_size=4),
                                      total_steps=steps)
    optimizer = module.configure_optimizers()          # after prepare: FIITED replaced the embedding tables
    compression.attach_optimizer(optimizer)
    module.train()
    micro = 0
    while compression.steps < steps:
        for batch in loader:
            (module.training_step(batch) / accumulate).backward()
            micro += 1
            if micro % accumulate:
                continue
            compression.after_backward()                # Callback.on_before_optimizer_step
            optimizer.step()
            optimizer.zero_grad()
            compression.step()                          # Callback.on_train_batch_end
            if compression.steps == steps:
                break
    compression.finalize()                              # Callback.on_fit_end
    return compression


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="MovieLens-100K folder (synthetic Criteo-shaped data without)")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    data = load_movielens(args.data) if args.data else load_synthetic_ctr(num_samples=40_000)
    torch.manual_seed(0)
    module = ClickModel(DLRM(data.info["num_dense"], data.info["cardinalities"], embedding_dim=32))
    loader = DataLoader(data.train, batch_size=128, shuffle=True)
    compression = fit(module, loader, args.steps)
    stage = compression.report()["stages"][0]
    module.eval()
    with torch.no_grad():
        *inputs, label = data.test.tensors
        auc = roc_auc(label, torch.sigmoid(module.net(*inputs)))
    print(f"{compression.steps} steps; test AUC {auc:.4f}; embeddings {stage['memory_ratio']:.1%} of dense "
          f"({stage['payload_bytes'] + stage['index_bytes']:,} of {stage['dense_bytes']:,} bytes)")


if __name__ == "__main__":
    main()
