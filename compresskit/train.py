"""The built-in train/eval loop used by every plugin: progress bar, metrics, atomic checkpoints and exact resume."""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from . import integrity
from .distributed.collective import Collective
from .distributed.prefetch import NextBatchIds
from .distributed.replacement import TablesReplaced, better_placement
from .distributed.sharding import data_parallel, sharded_names
from .errors import CheckpointError, CompressKitError, ConfigError, first_line
from .data.batches import batches, to_model_inputs
from .logs import TrainLog
from .metrics import accuracy, log_loss, roc_auc
from .resolve import build_optimizer

if TYPE_CHECKING:
    from .compression import Compression

CHECKPOINT_NAME = "checkpoint.pt"

log = logging.getLogger(__name__)


def task_loss(output: torch.Tensor, label: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """BCE-with-logits for binary tasks, cross-entropy for multiclass (``reduction``: mean or sum)."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), label.reshape(-1).float(),
                                                  reduction=reduction)
    return F.cross_entropy(output, label, reduction=reduction)


def local_rows(inputs: tuple, label: torch.Tensor, coll: Collective) -> tuple[tuple, torch.Tensor]:
    """This rank's contiguous share of a global batch (all of it in a one-process run)."""
    if not coll.distributed:
        return inputs, label
    start, end = coll.local_range(label.shape[0])
    return tuple(x[start:end] if torch.is_tensor(x) else x for x in inputs), label[start:end]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, task: str, batch_size: int = 4096,
             coll: Collective | None = None, collate: Callable[[tuple, torch.Tensor], Any] | None = None
             ) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``: AUC + log loss + accuracy (binary) or accuracy + loss (multiclass).
    In a distributed run every rank scores its share of each batch and every rank gets the same metrics.
    ``collate``: the DataBundle's, applied to each rank's rows (:func:`to_model_inputs`); the labels scored are
    the ones it returns."""
    coll = coll or Collective.single()
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for inputs, label in batches(dataset, batch_size):
        sizes = coll.split_sizes(label.shape[0])
        mine, mine_label = to_model_inputs(collate, *local_rows(inputs, label, coll))
        outputs.append(coll.all_gather_rows(model(*mine), sizes))
        labels.append(label if collate is None else coll.all_gather_rows(mine_label, sizes))
    model.train(was_training)
    out, y = torch.cat(outputs), torch.cat(labels)
    if not torch.isfinite(out).all():
        raise ConfigError("train", "the model's outputs on the evaluation split are NaN or infinite: training "
                                   "diverged (lower train.optimizer.lr) or the inputs hold NaN/inf values")
    if task == "binary":
        p = torch.sigmoid(out.reshape(-1).double())
        return {"auc": roc_auc(y.numpy(), p.numpy()), "logloss": log_loss(y, p),
                "accuracy": accuracy(y.reshape(-1), (p > 0.5).to(y.dtype))}
    return {"accuracy": accuracy(y, out.argmax(1)), "loss": float(F.cross_entropy(out, y))}


def with_next(items: Iterable) -> Iterator[tuple[Any, Any]]:
    """``(item, the next item or None)`` for each item."""
    iterator = iter(items)
    current = next(iterator, _END)
    while current is not _END:
        upcoming = next(iterator, _END)
        yield current, (None if upcoming is _END else upcoming)
        current = upcoming


_END = object()


def grouped(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def planned_steps(cfg: Any, n_train: int) -> int:
    """Optimizer steps a TrainConfig runs on ``n_train`` samples (epochs of micro-batches, capped by max_steps)."""
    total = steps_per_epoch(cfg, n_train) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def steps_per_epoch(cfg: Any, n_train: int) -> int:
    """Optimizer steps in one epoch: the epoch's micro-batches in groups of ``accumulate_grad_batches``."""
    return math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.accumulate_grad_batches)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded sample order of one epoch (a fixed function of seed and epoch, so a resume continues it)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


CHECKPOINT_KEYS = {"step": int, "model": dict, "optimizer": dict, "compression": dict, "rng": torch.Tensor,
                   "history": list, "running_loss": (float, type(None)), "fingerprint": str}


def checked_checkpoint(state: Any, path: str) -> dict[str, Any]:
    """``state`` if it has the shape of a one-process checkpoint (:data:`CHECKPOINT_KEYS`); a CheckpointError
    naming the first thing that is off otherwise."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a compresskit checkpoint (a mapping with "
                                    f"{', '.join(CHECKPOINT_KEYS)})")
    for key, kind in CHECKPOINT_KEYS.items():
        if key not in state:
            raise CheckpointError(path, f"is not a compresskit checkpoint: '{key}' is missing (expected "
                                        f"{', '.join(CHECKPOINT_KEYS)})")
        if not isinstance(state[key], kind):
            raise CheckpointError(path, f"is not a compresskit checkpoint: '{key}' is a "
                                        f"{type(state[key]).__name__}")
    return state


def optimizer_error(error: RuntimeError, cfg: Any, step: int) -> Exception:
    """The one-line error for an optimizer step that failed on the user's settings (a learning rate so large the
    float32 update overflows; an optimizer or weight decay that sparse gradients do not support), else ``error``."""
    text = str(error)
    if "overflow" in text:
        return ConfigError("train.optimizer.lr", f"the optimizer step overflowed at step {step} "
                                                 f"({first_line(error, 80)}): training diverged; lower the learning "
                                                 f"rate (now {cfg.lr:g})")
    if "sparse" in text.lower():
        return ConfigError("train.optimizer", f"{cfg.name} with weight_decay {cfg.weight_decay:g} cannot update the "
                                              f"sparse gradients of this model ({first_line(error, 100)}); with "
                                              f"sparse embedding gradients (model.args.sparse, a fiited stage's "
                                              f"sparse_grad) use sgd or adagrad without weight_decay")
    return error


class Trainer:
    """The built-in loop of ``compresskit apply``: trains ``compression.model`` on a DataBundle with the recipe's
    TrainConfig, driving the :class:`~compresskit.compression.Compression` handle like a user's loop would. It
    runs the ``total_steps`` the handle was prepared with (:func:`planned_steps`, planned once by the caller)."""

    def __init__(self, compression: Compression, data, train_cfg: Any, out_dir: str | None = None,
                 fingerprint: str = "", logging_cfg: Any = None) -> None:
        self.compression, self.data, self.cfg = compression, data, train_cfg
        self.logging_cfg = logging_cfg   # the recipe's LoggingConfig (None: rows kept in memory, no files)
        self.log: TrainLog | None = None
        self.out_dir, self.fingerprint = out_dir, fingerprint
        self.coll = compression.ctx.collective
        self._ddp: nn.Module | None = None
        self._ddp_params: tuple[int, ...] = ()
        self._ddp_ignored: set[str] | None = None     # sharded tables' names: fixed once the model is sharded
        self.steps_per_epoch = steps_per_epoch(train_cfg, len(data.train))
        if not compression.ctx.total_steps:     # prepared without a length: plan it here, once
            compression.ctx.total_steps = planned_steps(train_cfg, len(data.train))
        self.total_steps = compression.ctx.total_steps   # planned before prepare() schedules it (api.run)
        self.optimizer = build_optimizer(train_cfg.optimizer, self.model.parameters())
        compression.attach_optimizer(self.optimizer)
        self.history: list[dict[str, float]] = []
        self.running_loss: float | None = None   # smoothed training loss (checkpointed, so a resume reports it)

    @property
    def model(self) -> nn.Module:
        return self.compression.model

    @property
    def step(self) -> int:
        return self.compression.steps

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, CHECKPOINT_NAME) if self.out_dir else None

    def _meta(self) -> dict[str, Any]:
        return {"step": self.step, "compression": self.compression.state_dict(), "history": self.history,
                "running_loss": self.running_loss, "fingerprint": self.fingerprint, "world": self.coll.world}

    def save_checkpoint(self, placement: list[int] | None = None) -> None:
        """Atomically write everything needed to continue bit-for-bit from the current step (a distributed run:
        each rank its shard, see :mod:`compresskit.distributed.checkpoint`, and the table placement to resume
        with: ``placement``, or the current one)."""
        if not self.checkpoint_path:
            return
        if self.coll.distributed:
            from .distributed import checkpoint as sharded_checkpoint

            meta = {**self._meta(), "placement": placement or self.coll.table_owners}
            sharded_checkpoint.save(self.out_dir, self.model, self.optimizer, meta, self.coll)
            return
        integrity.save(self.checkpoint_path, {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "compression": self.compression.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
            "running_loss": self.running_loss,
            "fingerprint": self.fingerprint,
        })

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if one exists; returns whether it did."""
        path = self.checkpoint_path
        if not path:
            return False
        if self.coll.distributed:
            return self._load_sharded()
        from .distributed import checkpoint as sharded_checkpoint

        if not os.path.exists(path):
            if sharded_checkpoint.find(self.out_dir):
                raise ConfigError("--resume", f"'{sharded_checkpoint.find(self.out_dir)}' was written by a distributed "
                                              f"run; resume it with torchrun or --nproc (any number of ranks >= 2)")
            return False
        state = checked_checkpoint(integrity.load(path), path)
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError("--resume", f"'{path}' was written by a different recipe (model, data, stages or "
                                          f"optimizer differ); use another output.dir or drop --resume")
        try:
            self.model.load_state_dict(state["model"])
            # loading may replace parameters by ones of another size: the optimizer is built on the loaded ones
            self.optimizer = build_optimizer(self.cfg.optimizer, self.model.parameters())
            self.optimizer.load_state_dict(state["optimizer"])
            self.compression.attach_optimizer(self.optimizer)
            self.compression.load_state_dict(state["compression"])
            torch.set_rng_state(state["rng"])
        except CompressKitError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(path, f"does not fit this run's model, optimizer or stages "
                                        f"({first_line(e)}); use another output.dir or drop --resume") from None
        self.history = list(state["history"])
        self.running_loss = state["running_loss"]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _load_sharded(self) -> bool:
        from .distributed import checkpoint as sharded_checkpoint

        path = sharded_checkpoint.find(self.out_dir)
        if path is None:
            if os.path.exists(self.checkpoint_path):
                raise ConfigError("--resume", f"'{self.checkpoint_path}' was written by a one-process run; resume it "
                                              f"without torchrun or --nproc")
            return False
        sharded_checkpoint.verify(path)
        meta = sharded_checkpoint.read_meta(path, self.coll)
        if meta.get("fingerprint", "") != self.fingerprint:
            raise ConfigError("--resume", f"'{path}' was written by a different recipe (model, data, stages or "
                                          f"optimizer differ); use another output.dir or drop --resume")
        self.optimizer = sharded_checkpoint.load(
            path, self.model, lambda: build_optimizer(self.cfg.optimizer, self.model.parameters()), self.coll)
        self.compression.attach_optimizer(self.optimizer)
        self.compression.load_state_dict(meta["compression"])
        self.history = list(meta.get("history", []))
        self.running_loss = meta.get("running_loss")
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _better_placement(self) -> tuple[list[int], float, float] | None:
        """A placement of the tables by the bytes they hold now, when the run may re-place them here (a checkpoint
        to resume from, steps left, no stage changing table bytes any more: considered at the step that settles
        them and at every checkpoint after) and it evens the ranks out."""
        if not (self.coll.replace_tables and self.checkpoint_path and self.step < self.total_steps
                and self.compression.settled()):
            return None
        return better_placement(self.model, self.coll)

    def _forward_model(self) -> nn.Module:
        """The model to run forward/backward through: DDP over the dense part in a distributed run, rebuilt when a
        plugin has replaced one of the parameters it synchronises (DDP hooks the ones it saw when built)."""
        if not self.coll.distributed:
            return self.model
        if self._ddp_ignored is None:
            self._ddp_ignored = set(sharded_names(self.model))
        params = tuple(id(p) for n, p in self.model.named_parameters()
                       if p.requires_grad and n not in self._ddp_ignored)
        if self._ddp is None or params != self._ddp_params:
            self._ddp, self._ddp_params = data_parallel(self.model, self.coll), params
        return self._ddp

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (continuing from the current step) and return a summary with val/test metrics."""
        start_time = time.perf_counter()
        task, cfg, coll = self.data.task, self.cfg, self.coll
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and coll.is_main), dynamic_ncols=True)
        self.model.train()
        sent_before, first_step = dict(coll.sent), self.step
        self.log = TrainLog(self.logging_cfg, self.out_dir, writer=coll.is_main, start_step=self.step)
        log.info("training %d steps (%d per epoch) from step %d", self.total_steps, self.steps_per_epoch, self.step)
        self.next_ids = NextBatchIds(self.model, coll)
        # whether no stage changes table bytes any more (a re-placement is considered when they settle, and at
        # every checkpoint after)
        self._bytes_settled = self.compression.settled()
        try:
            self._loop(bar)
            self.next_ids.drain()
        except TablesReplaced as moved:
            moved.seconds = time.perf_counter() - start_time
            self.next_ids.drain()
            raise
        finally:
            bar.close()
            self.log.close()
        summary: dict[str, Any] = {"steps": self.step, "train_seconds": time.perf_counter() - start_time,
                                   "train_loss": self.running_loss, "history": self.history}
        if coll.distributed and self.step > first_step:
            summary["sent_bytes_per_step"] = {kind: (n - sent_before.get(kind, 0)) / (self.step - first_step)
                                              for kind, n in coll.sent.items()}
        if self.data.val is not None:
            summary["val"] = evaluate(self.model, self.data.val, task, cfg.eval_batch_size, coll, self.data.collate)
        summary["test"] = evaluate(self.model, self.data.test, task, cfg.eval_batch_size, coll, self.data.collate)
        log.info("finished at step %d: %s", self.step,
                 ", ".join(f"test {k} {v:.4f}" for k, v in summary["test"].items()))
        return summary

    def _loop(self, bar: tqdm) -> None:
        """The optimizer steps from the current one to ``total_steps`` (see :meth:`fit`)."""
        task, cfg, accumulate = self.data.task, self.cfg, self.cfg.accumulate_grad_batches
        coll, world = self.coll, self.coll.world
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            order = (epoch_order(len(self.data.train), cfg.seed, epoch) if cfg.shuffle
                     else torch.arange(len(self.data.train)))[skip * accumulate * cfg.batch_size:]
            prepared = ((*to_model_inputs(self.data.collate, *local_rows(inputs, label, coll)), label.shape[0])
                        for inputs, label in batches(self.data.train, cfg.batch_size, order))
            # one batch ahead only when its ids can be sent ahead (a collate then runs one batch early)
            ahead = with_next(prepared) if self.next_ids.active else ((item, None) for item in prepared)
            for group in grouped(ahead, accumulate):
                model = self._forward_model()
                self.optimizer.zero_grad(set_to_none=True)
                value = 0.0
                for i, ((inputs, label, n), upcoming) in enumerate(group):
                    last = i == len(group) - 1
                    with model.no_sync() if world > 1 and not last and hasattr(model, "no_sync") else nullcontext():
                        with self.next_ids.watch(inputs):
                            out = model(*inputs)
                        if upcoming is not None and (not last or self.step + 1 < self.total_steps):
                            self.next_ids.send(upcoming[0], upcoming[2])   # its ids travel during this step
                        if world > 1:   # each rank's share of the global mean; DDP averages over ranks
                            total = task_loss(out, label, task, "sum")
                            loss = total * (world / n) / accumulate
                            value += total.item() / n / accumulate
                        else:
                            loss = task_loss(out, label, task) / accumulate
                            value += loss.item()
                        loss.backward()
                value = coll.sum(value)
                if not math.isfinite(value):   # stop before the optimizer writes NaN into the weights
                    raise ConfigError("train", f"the training loss became {value} at step {self.step + 1}: "
                                               f"training diverged; lower train.optimizer.lr (now "
                                               f"{cfg.optimizer.lr:g}) or check the data for NaN/inf values")
                self.compression.after_backward()
                try:
                    self.optimizer.step()
                except RuntimeError as e:
                    raise optimizer_error(e, cfg.optimizer, self.step + 1) from None
                self.compression.step()
                running = value if self.running_loss is None else 0.98 * self.running_loss + 0.02 * value
                self.running_loss = running
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.log.due(self.step, self.step == self.total_steps):
                    self.log.record(self.step, epoch + 1, value, running, self.optimizer.param_groups[0]["lr"],
                                    self.compression.metrics())
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch:
                    self.history.append({"epoch": epoch + 1, "step": self.step, "train_loss": running})
                    log.info("epoch %d done at step %d: smoothed loss %.4f", epoch + 1, self.step, running)
                settling = not self._bytes_settled and self.compression.settled()
                self._bytes_settled = self._bytes_settled or settling
                due = self.step % cfg.checkpoint_every == 0 or end_of_epoch or self.step == self.total_steps
                placed = self._better_placement() if due or settling else None
                if due or placed:
                    self.save_checkpoint(placement=placed[0] if placed else None)
                    log.debug("checkpoint at step %d", self.step)
                    if placed:   # every rank: the run builds again with this placement and resumes (api.run)
                        raise TablesReplaced(self.step, placed[0],
                                             sum(a != b for a, b in zip(placed[0], coll.table_owners)), *placed[1:])
                if self.step >= self.total_steps:
                    break
