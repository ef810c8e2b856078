"""The one train/eval loop used by every plugin: progress bar, metrics, atomic checkpoints and exact resume."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .atomic import torch_save
from .errors import ConfigError
from .metrics import accuracy, log_loss, roc_auc
from .plugin import Plugin, RunContext
from .resolve import build_optimizer

CHECKPOINT_NAME = "checkpoint.pt"


def batches(dataset: TensorDataset, batch_size: int, order: torch.Tensor | None = None):
    """Yield (inputs tuple, label) batches of a TensorDataset whose last tensor is the label."""
    tensors = dataset.tensors
    n = len(order) if order is not None else len(tensors[-1])
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        parts = [t[idx] for t in tensors]
        yield tuple(parts[:-1]), parts[-1]


def task_loss(output: torch.Tensor, label: torch.Tensor, task: str) -> torch.Tensor:
    """BCE-with-logits for binary tasks, cross-entropy for multiclass."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), label.reshape(-1).float())
    return F.cross_entropy(output, label)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, task: str, batch_size: int = 4096) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``: AUC + log loss + accuracy (binary) or accuracy + loss (multiclass)."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for inputs, label in batches(dataset, batch_size):
        outputs.append(model(*inputs))
        labels.append(label)
    model.train(was_training)
    out, y = torch.cat(outputs), torch.cat(labels)
    if task == "binary":
        p = torch.sigmoid(out.reshape(-1).double())
        return {"auc": roc_auc(y.numpy(), p.numpy()), "logloss": log_loss(y, p),
                "accuracy": accuracy(y.reshape(-1), (p > 0.5).to(y.dtype))}
    return {"accuracy": accuracy(y, out.argmax(1)), "loss": float(F.cross_entropy(out, y))}


class Trainer:
    """Trains ``model`` on a DataBundle with the recipe's TrainConfig, calling plugin hooks every step."""

    def __init__(self, model: nn.Module, data, train_cfg: Any, plugins: Sequence[Plugin], ctx: RunContext,
                 out_dir: str | None = None) -> None:
        self.model, self.data, self.cfg, self.plugins, self.ctx = model, data, train_cfg, list(plugins), ctx
        self.out_dir = out_dir
        n = len(data.train)
        self.steps_per_epoch = math.ceil(n / train_cfg.batch_size)
        total = self.steps_per_epoch * train_cfg.epochs
        self.total_steps = min(total, train_cfg.max_steps) if train_cfg.max_steps else total
        self.optimizer = build_optimizer(train_cfg.optimizer, model.parameters())
        ctx.optimizer = self.optimizer
        ctx.total_steps = self.total_steps
        self.step = 0
        self.history: list[dict[str, float]] = []

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, CHECKPOINT_NAME) if self.out_dir else None

    def save_checkpoint(self) -> None:
        """Atomically write everything needed to continue bit-for-bit from the current step."""
        if not self.checkpoint_path:
            return
        torch_save(self.checkpoint_path, {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plugins": [p.state_dict() for p in self.plugins],
            "rng": torch.get_rng_state(),
            "history": self.history,
            "fingerprint": self.ctx.extras.get("fingerprint", ""),
        })

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if one exists; returns whether it did."""
        path = self.checkpoint_path
        if not path or not os.path.exists(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint", "") != self.ctx.extras.get("fingerprint", ""):
            raise ConfigError("--resume", f"'{path}' was written by a different recipe (model, data, stages or "
                                          f"optimizer differ); use another output.dir or drop --resume")
        self.model.load_state_dict(state["model"])
        # loading may replace parameters of a new size (e.g. a compacted FIITED pool): rebuild the optimizer
        self.optimizer = build_optimizer(self.cfg.optimizer, self.model.parameters())
        self.ctx.optimizer = self.optimizer
        self.optimizer.load_state_dict(state["optimizer"])
        for plugin, pstate in zip(self.plugins, state["plugins"]):
            plugin.load_state_dict(pstate)
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        return True

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train), generator=gen)

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (continuing from ``self.step``) and return a summary with val/test metrics."""
        start_time = time.perf_counter()
        task = self.data.task
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.cfg.progress, dynamic_ncols=True)
        self.model.train()
        running = None
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            order = self._epoch_order(epoch)[skip * self.cfg.batch_size:]
            for inputs, label in batches(self.data.train, self.cfg.batch_size, order):
                self.optimizer.zero_grad(set_to_none=True)
                loss = task_loss(self.model(*inputs), label, task)
                loss.backward()
                self.step += 1
                for p in self.plugins:
                    p.on_after_backward(self.step, self.ctx)
                self.optimizer.step()
                for p in self.plugins:
                    p.on_step(self.step, self.ctx)
                value = loss.item()
                running = value if running is None else 0.98 * running + 0.02 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch:
                    self.history.append({"epoch": epoch + 1, "step": self.step, "train_loss": running})
                if self.step % self.cfg.checkpoint_every == 0 or end_of_epoch or self.step == self.total_steps:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
        bar.close()
        summary: dict[str, Any] = {"steps": self.step, "train_seconds": time.perf_counter() - start_time,
                                   "train_loss": running, "history": self.history}
        if self.data.val is not None:
            summary["val"] = evaluate(self.model, self.data.val, task, self.cfg.eval_batch_size)
        summary["test"] = evaluate(self.model, self.data.test, task, self.cfg.eval_batch_size)
        return summary
