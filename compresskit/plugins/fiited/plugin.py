"""The ``fiited`` plugin: in-training embedding-dimension pruning, and the baselines it is measured against.

The stage converts the model's tables and runs the pruning schedule (``schedule.py``); what it converts them to and
what each round keeps is the ``method``'s, an object from the ``methods`` registry: ``fiited`` (the paper's
chunk pruning), ``adaembed``, ``mixed_dim``, ``uniform``, the hashing family ``hashing``, ``qr``, ``robe``,
``tt_rec``, and ``dense`` (the reference). Every method is charged what its modules really store: payload plus
index, measured from their tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ...distributed.collective import Collective
from ...errors import ConfigError
from ...plots import Figure
from ...plugin import Plugin, RunContext
from ...schema import build, option
from ...table_types import TableBytes, bytes_of
from .chunk_size import auto_chunk_size
from .embedding import FiitedEmbeddingBag, convert_embeddings, embedding_modules, fiited_modules
from .methods import TABLE_METHODS, TableMethod, TableSet
from .lazy_tables import lazy_capacities, make_lazy
from .schedule import kept_ratio, missing_length, on_grid, schedule_bounds
from ...distributed.placement import max_over_mean

log = logging.getLogger(__name__)


@dataclass
class PrecisionConfig:
    """``precision`` of a ``fiited`` stage: how the kept chunks are stored (docs/fiited.md#mixed-precision-chunks)."""

    storage: Literal["fp32", "int8", "int4"] = option(
        "fp32", help="chunk values: fp32, or int8 / int4 codes (fp16 scales a chunk or a row: scales)")
    cache_bytes: float = option(0.0, help="int8/int4: fraction of each table's dense fp32 bytes given to an fp32 "
                                          "cache of the most accessed rows' stored chunks (0 = no byte limit)",
                                min=0, max=1)
    cache_rows: float = option(0.0, help="int8/int4: fraction of each table's rows, the most accessed, served and "
                                         "trained in an fp32 cache (0 = no row limit; both 0: no cache, the "
                                         "byte-optimal setting on every "
                                         "dataset measured; docs/fiited.md#mixed-precision-chunks)", min=0, max=1)
    rounding: Literal["stochastic", "nearest"] = option(
        "stochastic", help="int8/int4: rounding of the uncached rows' updated values (stochastic keeps updates "
                           "smaller than a quantization step)")
    scales: Literal["chunk", "row"] = option(
        "chunk", help="int8/int4: one fp16 scale a chunk (2 bytes a stored chunk), or one fp16 scale and offset a "
                      "row (4 bytes a row, FBGEMM's row-wise layout: smaller when rows keep more than two chunks)")
    refresh_interval: Optional[int] = option(None, help="steps between cache refreshes (default: interval)",
                                             min=1)


@dataclass
class FiitedConfig:
    """Recipe fields of a ``fiited`` stage (documented in docs/fiited.md)."""

    method: str = option("fiited", help="pruning method: fiited, or a baseline (adaembed, mixed_dim, uniform; the "
                                        "hashing family hashing, qr, robe, tt_rec; dense), or one a package "
                                        "registered in compresskit.plugins.fiited.methods.TABLE_METHODS")
    target_memory_ratio: float = option(0.1, help="embedding bytes kept (payload + index: all inference needs) / "
                                                  "dense embedding bytes", min=0, max=1, min_exclusive=True)
    chunk_size: Union[int, Literal["auto"]] = option(
        "auto", help="values per dimension chunk (must divide the embedding dim); auto: 4, or 2 / 1 when the "
                     "budget holds less than one 4-value chunk a row (docs/fiited.md#choosing-settings)", min=1)
    include: list[str] = option([], help="module-name patterns to convert (default: every embedding)")
    decay: float = option(0.99, help="per-step utility decay gamma", min=0, max=1, min_exclusive=True)
    start_fraction: float = option(0.1, help="first pruning at this fraction of training steps", min=0, max=1)
    end_fraction: float = option(0.5, help="target reached at this fraction of training steps", min=0, max=1)
    start_step: Optional[int] = option(None, help="first pruning step (overrides start_fraction)", min=0)
    end_step: Optional[int] = option(None, help="step where the target is reached (overrides end_fraction)",
                                     min=1)
    interval: int = option(50, help="steps between pruning rounds", min=1)
    utility: Literal["gradient", "per_access", "magnitude", "gradient_weight"] = option(
        "gradient", help="fiited: a chunk's utility as the paper keeps it (decayed norm of its gradient summed over "
                         "each batch: it grows with access frequency); per_access: that divided by 1 + the row's "
                         "decayed access count (the gradient a row gets per access); magnitude: the norm of the "
                         "chunk's weights at the pruning round; gradient_weight: the two multiplied (a bound on the "
                         "loss change of removing the chunk). The last two not with regrow: a pruned chunk has no "
                         "weights")
    utility_exponent: float = option(0.5, help="chunk score = utility**exponent / (chunk+1)**position_discount",
                                     min=0)
    position_discount: float = option(2.0, help="diminishing return of a row's later chunks (0 = none)", min=0)
    schedule: Literal["cubic", "linear"] = option("cubic", help="how the kept ratio falls from 1 to the target")
    regrow: bool = option(False, help="fiited: a pruned chunk whose row earns more than the pruning threshold is "
                                      "stored again (something else is pruned to pay); rounds go on after the "
                                      "target is reached. For drifting data (off by default: it costs 0.001 AUC "
                                      "on stationary MovieLens at 5%)")
    mixed_dim_alpha: float = option(0.5, help="mixed_dim: bucket dims grow as access probability**alpha", min=0)
    lazy: bool = option(False, help="allocate rows on first access, pool capped at the target (huge tables)")
    headroom: float = option(0.1, help="lazy: fraction of the pool pruning frees for new rows", min=0, max=0.9)
    sparse_grad: bool = option(False, help="sparse pool gradients (SGD/Adagrad), when the update is not fused")
    fused_optimizer: Literal["auto", "none", "sgd", "adagrad", "rowwise_adagrad"] = option(
        "auto", help="update the tables inside backward (FBGEMM-style); auto: when train.optimizer is plain SGD or "
                     "Adagrad, the same update fused; none: a torch optimizer updates the pool")
    fused_lr: Optional[float] = option(None, help="learning rate of an explicitly fused optimizer "
                                                  "(default: train.optimizer.lr)", min=0, min_exclusive=True)
    fused_eps: float = option(1e-10, help="eps of the fused Adagrad optimizers (torch Adagrad's default)", min=0)
    precision: PrecisionConfig = option({}, help="chunk storage precision (int8/int4 with an fp32 hot-row cache); "
                                                 "target_memory_ratio still counts chunks at fp32 bytes")

    def __post_init__(self) -> None:
        if isinstance(self.precision, dict):   # built directly in Python (FiitedConfig(...)): type the nested form
            self.precision = build(PrecisionConfig, self.precision, "precision")

    def validate(self, path: str) -> None:
        if self.end_fraction < self.start_fraction:
            raise ConfigError(f"{path}.end_fraction", f"got {self.end_fraction}, expected >= start_fraction "
                                                      f"({self.start_fraction})")
        if self.start_step is not None and self.end_step is not None and self.end_step < self.start_step:
            raise ConfigError(f"{path}.end_step", f"got {self.end_step}, expected >= start_step ({self.start_step})")
        TABLE_METHODS.get(self.method, f"{path}.method").check(self, path)


class FiitedPlugin(Plugin):
    """Fine-grained in-training embedding dimension pruning with a prefix-chunk store (FIITED)."""

    name = "fiited"
    description = "FIITED: per-row embedding dimension pruning during training, memory freed by a chunk store"
    Config = FiitedConfig

    def __init__(self, config: FiitedConfig) -> None:
        super().__init__(config)
        self.coll = Collective.single()
        self.modules: list[tuple[str, nn.Module]] = []
        self.dense_bytes = 0
        self.rounds: list[dict[str, Any]] = []
        self.method: TableMethod = TABLE_METHODS.get(config.method)(config, self.error)

    # ------------------------------------------------------------------------------------------- set-up
    def _fused(self, ctx: RunContext) -> dict[str, Any]:
        """Keyword arguments that fuse the table update into backward, or ``{}`` for a torch optimizer."""
        cfg = self.config
        opt = getattr(ctx.train, "optimizer", None)
        name = cfg.fused_optimizer
        accumulate = getattr(ctx.train, "accumulate_grad_batches", 1)
        if accumulate > 1 and name not in ("auto", "none"):
            raise self.error("fused_optimizer", f"'{name}' updates the tables at every backward, which gradient "
                                                f"accumulation ({accumulate} micro-batches a step) would break; use "
                                                f"auto or none")
        if name == "auto" and accumulate > 1:
            name = "none"
        if name == "auto":
            plain = opt is not None and not getattr(opt, "weight_decay", 0)
            plain_sgd = plain and opt.name == "sgd" and not getattr(opt, "momentum", 0)
            name = "sgd" if plain_sgd else "adagrad" if plain and opt.name == "adagrad" else "none"
        if name == "none":
            return {}
        lr = cfg.fused_lr if cfg.fused_lr is not None else getattr(opt, "lr", None)
        if lr is None:
            raise self.error("fused_lr", f"fused_optimizer '{name}' needs a learning rate: set fused_lr or "
                                         f"train.optimizer")
        return {"optimizer": name, "lr": lr, "eps": cfg.fused_eps}

    def apply(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg, method = self.config, self.method
        coll = self.coll = ctx.collective
        fused = self._fused(ctx)
        if coll.distributed and method.single_process:
            raise self.error("method", f"{cfg.method} plans one budget over every table in one process; run it "
                                       f"without --nproc")
        if not list(fiited_modules(model)):
            dense = embedding_modules(model, cfg.include or None)
            self._check_placement(dense)
            self.dense_bytes = coll.sum(sum(m.weight.numel() * m.weight.element_size() for _, m in dense))
            if cfg.lazy:
                self._make_lazy(model, dense, fused)
            elif not method.in_training:
                self._replace(model, dense, ctx)
                return model
            else:
                chunk_size = self._chunk_size(dense)
                del dense                         # the dense tables go one by one as they are converted
                try:
                    convert_embeddings(model, chunk_size, cfg.include or None, **fused)
                except ValueError as e:
                    raise self.error("", str(e)) from None
        self.modules = list(fiited_modules(model))
        if not self.dense_bytes:
            self._check_placement(self.modules)
        quantized = cfg.precision.storage != "fp32"
        if quantized and not fused and any(m.optimizer is None for _, m in self.modules):
            opt = getattr(getattr(ctx.train, "optimizer", None), "name", None)
            raise self.error("precision.storage", f"'{cfg.precision.storage}' chunks are trained by a fused optimizer "
                                                  f"only, and train.optimizer '{opt}' (fused_optimizer "
                                                  f"'{cfg.fused_optimizer}') is not fused: use plain sgd / adagrad, "
                                                  f"or set fused_optimizer and fused_lr")
        for index, (mod_name, m) in enumerate(self.modules):
            if cfg.lazy and not m.lazy:
                raise self.error("lazy", f"module {mod_name} is not a lazy FiitedEmbeddingBag")
            if m.optimizer is None and fused:
                m.set_optimizer(**fused)
            if quantized and not m.store.quantized:
                try:
                    m.set_precision(cfg.precision.storage, cfg.precision.cache_rows, cfg.precision.rounding,
                                    seed=self._table_index(mod_name) if coll.distributed else index,
                                    scales=cfg.precision.scales, cache_bytes=cfg.precision.cache_bytes)
                except ValueError as e:
                    raise self.error("precision", f"{mod_name}: {e}") from None
            m.sparse = m.sparse or cfg.sparse_grad
            if method.in_training:
                method.track(m)
            m.store.attach_optimizer(ctx.optimizer)
        if not self.dense_bytes:
            self.dense_bytes = coll.sum(sum(m.num_embeddings * m.embedding_dim * m.store.pool.element_size()
                                            for _, m in self.modules))
        return model

    def _chunk_size(self, dense: list[tuple[str, nn.Module]]) -> int:
        """``chunk_size``, with ``auto`` resolved over every rank's tables (one size for the whole stage, so one
        chunk budget ranks them all)."""
        cfg = self.config
        if cfg.chunk_size != "auto":
            return cfg.chunk_size
        shapes = [(m.num_embeddings, m.embedding_dim) for _, m in dense]
        everywhere = sum(self.coll.all_gather_object(shapes), []) if self.coll.distributed else shapes
        return auto_chunk_size(cfg.target_memory_ratio, everywhere, cfg.precision.storage)

    def _check_placement(self, tables: list[tuple[str, nn.Module]]) -> None:
        """Every rank found tables (over all ranks), and in a distributed run each one is sharded to this rank:
        a replicated table would be pruned on each rank's own gradients and drift apart."""
        cfg, coll = self.config, self.coll
        if coll.sum(len(tables)) == 0:
            raise self.error("include", f"no nn.Embedding/nn.EmbeddingBag matched {cfg.include or 'any module'} "
                                        f"in the model")
        if coll.distributed:
            stray = [name for name, _ in tables if coll.local_tables is None or name not in coll.local_tables]
            if stray:
                raise self.error("", f"table '{stray[0]}' is not sharded: in a distributed run FIITED needs its "
                                     f"tables in an EmbeddingTables collection (as DLRM's) or a TorchRec "
                                     f"EmbeddingBagCollection, and distributed.sharding: table_wise")

    def _make_lazy(self, model: nn.Module, dense: list[tuple[str, nn.Module]], fused: dict[str, Any]) -> None:
        """Lazy tables in place of tables that were never allocated (``lazy: true``; :mod:`.lazy_tables`), each with
        its share of the budget."""
        cfg = self.config
        allocated = [name for name, m in dense if not m.weight.is_meta]
        if allocated:
            raise self.error("lazy", f"lazy tables replace tables that were never allocated, and '{allocated[0]}' "
                                     f"is: build the model with its tables on the meta device (the built-in dlrm "
                                     f"does when its recipe's fiited stage is lazy) or with lazy FiitedEmbeddingBag "
                                     f"modules")
        if not self.method.in_training:
            raise self.error("lazy", f"method '{cfg.method}' does not prune in training, and lazy tables need it")
        chosen = {name for name, _ in dense}
        unbuilt = [name for name, m in embedding_modules(model) if m.weight.is_meta and name not in chosen]
        if unbuilt:
            raise self.error("include", f"'{unbuilt[0]}' was never allocated (a lazy stage's model builds no tables) "
                                        f"and {cfg.include} leaves it out: include every table, or drop lazy")
        chunk_size = self._chunk_size(dense)
        # (table index, rows, dim) of every rank's tables: every rank shares the budget the same way
        mine = [(self._table_index(name) if self.coll.distributed else i, m.num_embeddings, m.embedding_dim)
                for i, (name, m) in enumerate(dense)]
        everywhere = sorted(sum(self.coll.all_gather_object(mine), []) if self.coll.distributed else mine)
        try:
            capacities = lazy_capacities([(rows, dim) for _, rows, dim in everywhere], chunk_size,
                                         cfg.target_memory_ratio * self.dense_bytes, chunk_size * 4)
        except ValueError as e:
            raise self.error("target_memory_ratio", str(e)) from None
        by_index = {index: capacity for (index, _, _), capacity in zip(everywhere, capacities)}
        try:
            make_lazy(model, dense, [by_index[index] for index, _, _ in mine], [index for index, _, _ in mine],
                      chunk_size, **fused)
        except ValueError as e:
            raise self.error("lazy", str(e)) from None

    def _replace(self, model: nn.Module, dense: list[tuple[str, nn.Module]], ctx: RunContext) -> None:
        """A method that is not in training puts its own natural form in place of the dense tables, within the
        same total bytes (or keeps them: dense)."""
        cfg = self.config
        tables = self._table_set(dense, local=False)
        try:
            twins = self.method.replace(model, tables, int(cfg.target_memory_ratio * self.dense_bytes), ctx)
        except ValueError as e:
            raise self.error("target_memory_ratio", f"{cfg.method}: {e}") from None
        if twins is None:
            self.modules = dense
            return
        for (name, _), twin in zip(dense, twins):
            model.set_submodule(name, twin)
            self.modules.append((name, twin))
        self._record_round({"step": 0, "kept_bytes": self.memory().get("total", 0)})

    def _table_set(self, modules: list[tuple[str, nn.Module]], local: bool) -> TableSet:
        """``modules`` as a method sees them: over every rank's tables, or (``local``) on their own."""
        if local:
            return TableSet(modules, Collective.single(), list(range(len(modules))), len(modules), self._table_index)
        index = {name: self._table_index(name) if self.coll.distributed else i for i, (name, _) in enumerate(modules)}
        return TableSet(modules, self.coll, [index[name] for name, _ in modules], self.coll.num_tables(len(modules)),
                        index.__getitem__)

    # ------------------------------------------------------------------------------------------- training
    def _schedule_bounds(self, total_steps: int) -> tuple[int, int]:
        field = missing_length(self.config, total_steps)
        if field is not None:
            raise self.error(field, "a schedule in fractions of training needs its length: pass "
                                    "prepare(..., total_steps=N), or set start_step and end_step")
        return schedule_bounds(self.config, total_steps)

    def _target_chunks(self, ratio: float) -> int:
        """Chunks the payload may hold so that payload + index stays within ``ratio`` of the dense bytes."""
        index = self.coll.sum(sum(bytes_of(m).index for _, m in self.modules))
        chunk_bytes = self.coll.max(max((m.chunk_size * m.store.pool.element_size() for _, m in self.modules),
                                        default=0))
        room = ratio * self.dense_bytes - index
        if room < chunk_bytes:
            raise self.error("target_memory_ratio",
                             f"{self.config.target_memory_ratio} of {self.dense_bytes} dense bytes leaves no room "
                             f"for chunks: the index alone takes {index} bytes; raise the ratio")
        return int(room // chunk_bytes)

    def on_step(self, step: int, ctx: RunContext) -> None:
        cfg = self.config
        if not self.method.in_training:
            return
        start, end = self._schedule_bounds(ctx.total_steps)
        for name, m in self.modules:
            if ctx.optimizer is None and m.store.pool.requires_grad:
                raise ConfigError("optimizer", f"{name}'s pool is trained by a torch optimizer and pruning replaces "
                                               f"it: pass that optimizer (prepare(..., optimizer=opt) or "
                                               f"compression.attach_optimizer(opt))")
            m.store.attach_optimizer(ctx.optimizer)
        refresh = cfg.precision.refresh_interval or cfg.interval
        if step % refresh == 0:
            for _, m in self.modules:
                m.refresh_cache()
        if not on_grid(step, start, end, cfg.interval) or (step > end and not cfg.lazy and not self.method.adaptive):
            return
        if cfg.lazy:  # each lazy table has its own pool: prune the ones fuller than 1 - headroom, one at a time
            pruned = [name for name, m in self.modules
                      if self.method.prune(int(m.store.capacity * (1 - cfg.headroom)),
                                           self._table_set([(name, m)], local=True)) is not None]
            pruned = sorted(sum(self.coll.all_gather_object(pruned), []), key=self._table_index)
            if pruned:
                self._record_round({"step": step, "kept_chunks": self.stored_chunks(), "tables": pruned})
                log.debug("step %d: pruned lazy tables %s to %d chunks", step, ", ".join(pruned),
                          self.rounds[-1]["kept_chunks"])
        else:
            self.prune_to(self._target_chunks(kept_ratio(step, start, end, cfg.target_memory_ratio, cfg.schedule)),
                          step)

    def settled(self, step: int, ctx: RunContext) -> bool:
        """Past the end of the pruning schedule. Never for lazy tables (they prune whenever they fill) or adaptive
        methods (regrowth, AdaEmbed: chunks keep moving between tables after the schedule)."""
        if not self.method.in_training:
            return True
        if self.config.lazy or self.method.adaptive or missing_length(self.config, ctx.total_steps) is not None:
            return False
        return step >= schedule_bounds(self.config, ctx.total_steps)[1]

    def prune_to(self, target: int, step: int = 0) -> None:
        """Keep the ``target`` highest-scoring chunks over all tables (on every rank): one threshold over all of
        them, the same whatever the number of ranks. With regrowth (and for AdaEmbed) candidates compete too: a
        missing chunk (row) scoring above the threshold comes back and something below it goes."""
        grown = self.method.prune(target, self._table_set(self.modules, local=False))
        if grown is not None:
            self._record_round({"step": step, "kept_chunks": self.stored_chunks(), "tables": "all",
                                "regrown_rows": self.coll.sum(grown)})
            log.debug("step %d: %d chunks over all tables, %d rows regrown", step, self.rounds[-1]["kept_chunks"],
                      self.rounds[-1]["regrown_rows"])

    def _record_round(self, record: dict[str, Any]) -> None:
        """Keep a pruning round's record; a distributed run adds every rank's table bytes (one small gather a
        round, beside the round's own reductions), so every rank's records, and a checkpoint's, hold them all."""
        if self.coll.distributed:
            record["rank_bytes"] = self.coll.all_gather_object(self.memory(local=True)["total"])
        self.rounds.append(record)

    def rank_balance(self) -> list[dict[str, float]]:
        """Max over mean of the ranks' table bytes after every pruning round of a distributed run (also those
        before a resume or a re-placement of the tables; empty in one process)."""
        return [{"step": r["step"], "max_over_mean": max_over_mean(r["rank_bytes"])}
                for r in self.rounds if r.get("rank_bytes")]

    def _table_index(self, name: str) -> int:
        """Position of table ``name`` in the model's table order (over every rank when sharded)."""
        if self.coll.distributed:
            return self.coll.table_index(name, 0)
        return [n for n, _ in self.modules].index(name)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint of an older compresskit kept one rank's own bytes a round ("local_bytes"): not a balance
        self.rounds = [{k: v for k, v in r.items() if k != "local_bytes"} for r in state.get("rounds", [])]

    # ------------------------------------------------------------------------------------------- reporting
    def stored_chunks(self) -> int:
        """Chunks stored across all FIITED modules (of every rank)."""
        return self.coll.sum(sum(m.store.live for _, m in self.modules if isinstance(m, FiitedEmbeddingBag)))

    def memory(self, local: bool = False) -> dict[str, int]:
        """Summed bytes of all tables (of every rank unless ``local``), measured from their tensors (payload, index,
        training state, total)."""
        held = sum((bytes_of(m) for _, m in self.modules), TableBytes(0))
        total = {"payload": held.payload, "index": held.index, "training": held.training, "total": held.total,
                 "cache": held.cache}
        return total if local else {k: self.coll.sum(v) for k, v in total.items()}

    def report(self, ctx: RunContext) -> dict[str, Any]:
        mem = self.memory()
        per_module = []
        for name, m in self.modules:
            dims, mem_m = kept_dims(m), bytes_of(m)
            per_module.append([name, m.num_embeddings, m.embedding_dim, mem_m.payload, mem_m.index,
                               float((dims == 0).float().mean()), float(dims.float().mean())])
        per_module = sorted(sum(self.coll.all_gather_object(per_module), []), key=lambda row: self._table_index(row[0]))
        stored = mem.get("payload", 0) + mem.get("index", 0)
        sizes = sorted({int(m.chunk_size) for _, m in self.modules if hasattr(m, "chunk_size")})
        sizes = sorted(set(sum(self.coll.all_gather_object(sizes), []))) if self.coll.distributed else sizes
        return {
            "method": self.config.method,
            "chunk_size": sizes[0] if len(sizes) == 1 else (sizes or None),   # as resolved (chunk_size: auto)
            "dense_bytes": self.dense_bytes,
            "payload_bytes": mem.get("payload", 0),
            "index_bytes": mem.get("index", 0),
            "training_state_bytes": mem.get("training", 0),
            "memory_ratio": stored / max(self.dense_bytes, 1),
            "payload_ratio": mem.get("payload", 0) / max(self.dense_bytes, 1),
            "stored_chunks": self.stored_chunks(),
            "pruning_rounds": len(self.rounds),
            "storage": self.config.precision.storage,
            "cache_bytes": mem.get("cache", 0),
            **({"rank_bytes": self.coll.all_gather_object(self.memory(local=True)["total"]),
                "rank_balance": self.rank_balance()} if self.coll.distributed else {}),
            "tables": [{"title": "Embedding tables", "columns": [
                "module", "rows", "dim", "payload bytes", "index bytes", "rows fully pruned", "mean dim kept"],
                "rows": per_module}],
        }

    def metrics(self, ctx: RunContext) -> dict[str, float]:
        """The training log's FIITED columns: bytes stored (payload, index) and their ratios to the dense tables
        (``kept_ratio``: payload only), summed over ranks."""
        mem = self.memory()
        dense = max(self.dense_bytes, 1)
        return {"kept_ratio": mem.get("payload", 0) / dense,
                "memory_ratio": (mem.get("payload", 0) + mem.get("index", 0)) / dense,
                "payload_bytes": mem.get("payload", 0), "index_bytes": mem.get("index", 0)}

    def figures(self, ctx: RunContext, log: list[dict[str, float]]) -> list[Figure]:
        """Bytes over training (from the log) and the histogram of what each row keeps, per table."""
        figures = []
        if log and "payload_bytes" in log[0]:
            steps = [r["step"] for r in log]
            series = {name: (steps, [r[key] / 2**20 for r in log]) for name, key in
                      (("payload", "payload_bytes"), ("index", "index_bytes"))}
            series["payload + index"] = (steps, [(r["payload_bytes"] + r["index_bytes"]) / 2**20 for r in log])
            figures.append(Figure("fiited_bytes", f"FIITED ({self.config.method}): embedding bytes over training",
                                  "line", series, xlabel="optimizer step", ylabel="MiB", steps=True,
                                  hlines={"dense tables": self.dense_bytes / 2**20,
                                          f"target ({self.config.target_memory_ratio:g} of dense)":
                                          self.config.target_memory_ratio * self.dense_bytes / 2**20}))
        figures.append(self._kept_histogram())
        return figures

    def _kept_histogram(self) -> Figure:
        """Fraction of each table's rows by what they keep: chunks (FIITED stores) or dims (the baselines); the
        largest tables by name, the others together."""
        chunked = all(isinstance(m, FiitedEmbeddingBag) for _, m in self.modules)
        mine = []
        for name, m in self.modules:
            kept = m.row_chunk_counts() if chunked else kept_dims(m)
            mine.append((name, m.num_embeddings, torch.bincount(kept.long()).tolist()))
        tables = sorted(sum(self.coll.all_gather_object(mine), []), key=lambda t: self._table_index(t[0]))
        width = max(len(hist) for _, _, hist in tables)
        shown = sorted(tables, key=lambda t: -t[1])[:5] if len(tables) > 6 else tables
        series = {f"{name} ({rows:,} rows)": [h / rows for h in hist + [0] * (width - len(hist))]
                  for name, rows, hist in shown if rows}
        rest = [t for t in tables if t not in shown]
        if rest:
            total = [0] * width
            for _, _, hist in rest:
                total = [a + b for a, b in zip(total, hist + [0] * (width - len(hist)))]
            rows = sum(r for _, r, _ in rest)
            series[f"{len(rest)} other tables ({rows:,} rows)"] = [h / rows for h in total]
        unit = f"chunks of {self.modules[0][1].chunk_size} dims" if chunked and self.modules else "dims"
        # every chunk count is a bar; of the dims (up to the full dim) only the values some row keeps
        used = list(range(width)) if chunked else [i for i in range(width) if any(v[i] for v in series.values())]
        return Figure("fiited_kept_per_row", f"FIITED ({self.config.method}): {unit} kept per row", "bars",
                      {k: [v[i] for i in used] for k, v in series.items()}, categories=used,
                      xlabel=f"kept per row ({unit})", ylabel="fraction of the table's rows")


def kept_dims(m: nn.Module) -> torch.Tensor:
    """Dimensions each row keeps (int64 ``[num_embeddings]``)."""
    if isinstance(m, FiitedEmbeddingBag):
        return m.row_chunk_counts() * m.chunk_size
    if hasattr(m, "row_dims"):
        return m.row_dims()
    return torch.full((m.num_embeddings,), m.embedding_dim)
