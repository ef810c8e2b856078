"""The ``fiited`` plugin: in-training embedding-dimension pruning, and its baselines on the same code path.

Methods (all use the VHPI store, so bytes are measured the same way):

* ``fiited``: chunk-level pruning by decayed chunk utility, gradually during training (the paper's method);
* ``adaembed``: AdaEmbed-style whole-row pruning by row utility, gradually during training;
* ``mixed_dim``: static frequency-based mixed dimensions (rows get chunks by ``freq**alpha``), before training;
* ``uniform``: every row keeps the same number of leading chunks, before training;
* ``dense``: no pruning (the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...plugin import Plugin, RunContext
from ...registry import register_plugin
from ...schema import option
from ...train import batches, reset_optimizer_rows, shrink_parameter_rows
from .embedding import UTILITY, FiitedEmbeddingBag, convert_embeddings, fiited_modules
from .importance import accumulate_utility, lowest, lowest_rows, prefix_scores, row_sums


@dataclass
class FiitedConfig:
    """Recipe fields of a ``fiited`` stage (documented in docs/fiited.md)."""

    method: Literal["fiited", "adaembed", "mixed_dim", "uniform", "dense"] = option(
        "fiited", help="pruning method (fiited, or a baseline)")
    target_memory_ratio: float = option(0.1, help="embedding payload bytes kept / dense payload bytes",
                                        min=0, max=1, min_exclusive=True)
    chunk_size: int = option(8, help="values per dimension chunk (must divide the embedding dim)", min=1)
    include: list[str] = option([], help="module-name patterns to convert (default: every embedding)")
    decay: float = option(0.99, help="per-step utility decay gamma", min=0, max=1, min_exclusive=True)
    start_fraction: float = option(0.1, help="first pruning at this fraction of training steps", min=0, max=1)
    end_fraction: float = option(0.5, help="target reached at this fraction of training steps", min=0, max=1)
    start_step: Optional[int] = option(None, help="first pruning step (overrides start_fraction)", min=0)
    end_step: Optional[int] = option(None, help="step where the target is reached (overrides end_fraction)",
                                     min=1)
    interval: int = option(50, help="steps between pruning rounds", min=1)
    utility_exponent: float = option(0.5, help="chunk score = utility**exponent / (chunk+1)**position_discount",
                                     min=0)
    position_discount: float = option(2.0, help="diminishing return of a row's later chunks (0 = none)", min=0)
    schedule: Literal["cubic", "linear"] = option("cubic", help="how the kept ratio falls from 1 to the target")
    mixed_dim_alpha: float = option(0.5, help="mixed_dim: chunks per row grow as frequency**alpha", min=0)
    compact: bool = option(True, help="shrink the pool after each pruning round (really frees memory)")
    load_factor: float = option(0.75, help="hash index load factor", min=0.1, max=0.95)
    lazy: bool = option(False, help="allocate rows on first access, pool capped at the target (huge tables)")
    headroom: float = option(0.1, help="lazy: fraction of the pool kept free for new rows", min=0, max=0.9)
    sparse_grad: bool = option(False, help="sparse pool gradients (SGD/Adagrad)")

    def validate(self, path: str) -> None:
        if self.end_fraction < self.start_fraction:
            raise ConfigError(f"{path}.end_fraction", f"got {self.end_fraction}, expected >= start_fraction "
                                                      f"({self.start_fraction})")
        if self.start_step is not None and self.end_step is not None and self.end_step < self.start_step:
            raise ConfigError(f"{path}.end_step", f"got {self.end_step}, expected >= start_step ({self.start_step})")
        if self.lazy and self.method not in ("fiited", "adaembed"):
            raise ConfigError(f"{path}.lazy", f"lazy allocation needs an in-training method, not '{self.method}'")


def kept_ratio(step: int, start: int, end: int, target: float, schedule: str) -> float:
    """Fraction of dense chunks to keep at ``step``: 1 before ``start``, ``target`` from ``end`` on."""
    if step < start:
        return 1.0
    if step >= end or end <= start:
        return target
    progress = (step - start) / (end - start)
    fall = 1 - (1 - progress) ** 3 if schedule == "cubic" else progress
    return 1.0 - (1.0 - target) * fall


@register_plugin
class FiitedPlugin(Plugin):
    """Fine-grained in-training embedding dimension pruning with a VHPI chunk store (FIITED)."""

    name = "fiited"
    description = "FIITED: per-row embedding dimension pruning during training, memory freed via a VHPI store"
    Config = FiitedConfig

    def __init__(self, config: FiitedConfig) -> None:
        super().__init__(config)
        self.modules: list[tuple[str, FiitedEmbeddingBag]] = []
        self.dense_chunks = 0
        self.dense_payload_bytes = 0
        self.rounds: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- set-up
    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        existing = list(fiited_modules(model))
        if not existing:
            if cfg.lazy:
                raise ConfigError("fiited.lazy", "lazy allocation needs a model built with lazy "
                                                 "FiitedEmbeddingBag modules (a dense model is already allocated)")
            try:
                convert_embeddings(model, cfg.chunk_size, cfg.include or None, load_factor=cfg.load_factor)
            except ValueError as e:
                raise ConfigError("fiited", str(e)) from None
        self.modules = list(fiited_modules(model))
        if not self.modules:
            raise ConfigError("fiited.include", f"no nn.Embedding/nn.EmbeddingBag matched "
                                                f"{cfg.include or 'any module'} in {type(model).__name__}")
        for mod_name, m in self.modules:
            m.sparse = m.sparse or cfg.sparse_grad
            if cfg.lazy and not m.lazy:
                raise ConfigError("fiited.lazy", f"module {mod_name} is not a lazy FiitedEmbeddingBag")
        self.dense_chunks = sum(m.num_embeddings * m.num_chunks for _, m in self.modules)
        self.dense_payload_bytes = sum(m.num_embeddings * m.embedding_dim * m.store.pool.element_size()
                                       for _, m in self.modules)
        if cfg.method == "uniform":
            self._prune_uniform()
        elif cfg.method == "mixed_dim":
            self._prune_mixed_dim(model, ctx)
        return model

    def _target_chunks(self, ratio: float) -> int:
        return int(ratio * self.dense_chunks)

    def _prune_uniform(self) -> None:
        ratio = self.config.target_memory_ratio
        for name, m in self.modules:
            keep = int(ratio * m.num_chunks + 1e-9)
            if keep < 1:
                raise ConfigError("fiited.target_memory_ratio",
                                  f"uniform keeps whole chunks per row: {ratio} of {m.num_chunks} chunks of {name} "
                                  f"is below one chunk; use a smaller chunk_size or another method")
            rows, chunks, _ = m.store.entries()
            drop = chunks >= keep
            m.store.remove(rows[drop], chunks[drop])
            self._compact(m, None)
        self.rounds.append({"step": 0, "kept_chunks": self.stored_chunks()})

    def _prune_mixed_dim(self, model: nn.Module, ctx: RunContext) -> None:
        if ctx.data is None:
            raise ConfigError("fiited.method", "mixed_dim needs training data to count row frequencies")
        for _, m in self.modules:
            m.count_accesses(True)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for inputs, _ in batches(ctx.data.train, 8192):
                model(*inputs)
        model.train(was_training)
        scores, owners = [], []
        for _, m in self.modules:
            rows, chunks, _ = m.store.entries()
            freq = m.counts[rows].float() ** self.config.mixed_dim_alpha
            scores.append(freq / (chunks.float() + 1))
            owners.append((rows, chunks))
            m.count_accesses(False)
        self._prune_to(self._target_chunks(self.config.target_memory_ratio), scores, owners, rows_whole=False,
                       step=0, optimizer=None)

    # ------------------------------------------------------------------------------------------- training
    def _schedule_bounds(self, total_steps: int) -> tuple[int, int]:
        cfg = self.config
        start = cfg.start_step if cfg.start_step is not None else int(cfg.start_fraction * total_steps)
        end = cfg.end_step if cfg.end_step is not None else int(cfg.end_fraction * total_steps)
        return max(start, 1), max(end, start, 1)

    def on_after_backward(self, step: int, ctx: RunContext) -> None:
        if self.config.method not in ("fiited", "adaembed"):
            return
        for _, m in self.modules:
            accumulate_utility(m, self.config.decay)
            if m.new_slots:
                reset_optimizer_rows(ctx.optimizer, m.store.pool, torch.cat(m.new_slots))
                m.new_slots.clear()

    def on_step(self, step: int, ctx: RunContext) -> None:
        cfg = self.config
        if cfg.method not in ("fiited", "adaembed"):
            return
        start, end = self._schedule_bounds(ctx.total_steps)
        on_grid = step >= start and ((step - start) % cfg.interval == 0 or step == end)
        if not on_grid or (step > end and not cfg.lazy):
            return
        if cfg.lazy:
            target = int(sum(m.store.capacity for _, m in self.modules) * (1 - cfg.headroom))
        else:
            ratio = kept_ratio(step, start, end, cfg.target_memory_ratio, cfg.schedule)
            target = self._target_chunks(ratio)
        scores, owners = [], []
        for _, m in self.modules:
            rows, chunks, slots = m.store.entries()
            util = getattr(m.store, UTILITY)[slots]
            if cfg.method == "adaembed":
                scores.append(row_sums(rows, util))
            else:
                prefix = prefix_scores(rows, chunks, util, m.num_chunks)
                scores.append(prefix ** cfg.utility_exponent / (chunks.float() + 1) ** cfg.position_discount)
            owners.append((rows, chunks))
        self._prune_to(target, scores, owners, rows_whole=cfg.method == "adaembed", step=step,
                       optimizer=ctx.optimizer)

    def _prune_to(self, target: int, scores: list[torch.Tensor], owners: list[tuple[torch.Tensor, torch.Tensor]],
                  rows_whole: bool, step: int, optimizer) -> None:
        """Remove the lowest-scoring entries across all modules until at most ``target`` chunks are stored."""
        live = sum(r.numel() for r, _ in owners)
        excess = live - target
        if excess <= 0:
            return
        all_scores = torch.cat(scores)
        all_chunks = torch.cat([c for _, c in owners])
        if rows_whole:
            offsets = [0]
            for _, m in self.modules:
                offsets.append(offsets[-1] + m.num_embeddings)
            global_rows = torch.cat([r + offsets[k] for k, (r, _) in enumerate(owners)])
            chosen = lowest_rows(all_scores, global_rows, excess)
        else:
            chosen = lowest(all_scores, all_chunks, excess)
        drop = torch.zeros(live, dtype=torch.bool)
        drop[chosen] = True
        start = 0
        for k, (_, m) in enumerate(self.modules):
            rows, chunks = owners[k]
            part = drop[start:start + rows.numel()]
            start += rows.numel()
            if part.any():
                m.store.remove(rows[part], chunks[part])
                if self.config.compact and not self.config.lazy:
                    self._compact(m, optimizer)
        self.rounds.append({"step": step, "kept_chunks": self.stored_chunks()})

    @staticmethod
    def _compact(m: FiitedEmbeddingBag, optimizer) -> None:
        m.store.compact(lambda mod, name, keep: shrink_parameter_rows(mod, name, keep, optimizer))

    # ------------------------------------------------------------------------------------------- reporting
    def stored_chunks(self) -> int:
        """Chunks stored across all FIITED modules."""
        return sum(m.store.live for _, m in self.modules)

    def memory(self) -> dict[str, int]:
        """Summed store bytes of all modules, measured from their tensors."""
        total: dict[str, int] = {}
        for _, m in self.modules:
            for k, v in m.memory_bytes().items():
                total[k] = total.get(k, 0) + v
        return total

    def report(self, ctx: RunContext) -> dict[str, Any]:
        mem = self.memory()
        stored = self.stored_chunks()
        per_module = []
        for name, m in self.modules:
            counts = m.row_chunk_counts()
            per_module.append([name, m.num_embeddings, m.embedding_dim, m.store.live,
                               m.store.memory_bytes()["payload"], float((counts == 0).float().mean()),
                               float(counts.float().mean() * m.chunk_size)])
        return {
            "method": self.config.method,
            "dense_payload_bytes": self.dense_payload_bytes,
            "payload_bytes": mem.get("payload", 0),
            "index_bytes": mem.get("index", 0),
            "stats_bytes": mem.get("stats", 0),
            "payload_ratio": mem.get("payload", 0) / max(self.dense_payload_bytes, 1),
            "total_ratio": mem.get("total", 0) / max(self.dense_payload_bytes, 1),
            "stored_chunks": stored,
            "dense_chunks": self.dense_chunks,
            "pruning_rounds": len(self.rounds),
            "tables": [{"title": "Embedding tables", "columns": [
                "module", "rows", "dim", "stored chunks", "payload bytes", "rows fully pruned", "mean dim kept"],
                "rows": per_module}],
        }
