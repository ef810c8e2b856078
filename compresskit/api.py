"""Running recipes with the built-in trainer: :func:`apply` (Python) and :func:`run` (``compresskit apply``), both
on the one engine, :func:`compresskit.prepare`."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import integrity
from .atomic import prepare_output_dir, write_bytes, write_json, write_text
from .data import DataBundle
from .distributed.collective import Collective
from .distributed.comm_model import step_bytes
from .distributed.launch import agreement
from .distributed.placement import max_over_mean, place_tables
from .distributed.replacement import TablesReplaced, recorded_placement
from .distributed.sharding import ShardedCollection, shard_tables, sharded_names
from .metrics import module_bytes
from .models.materialize import building_tables_for
from .errors import ConfigError
from .layout import LAYOUT_FILE, Layout, module_records, write_layout
from .logs import run_log
from .plots import Figure, render_html, render_png, training_figures
from .compression import prepare
from .plugin import Plugin
from .recipe import Recipe, is_validated, load_recipe, validate_recipe
from .report import render_markdown
from .resolve import check_model_config, load_weights, read_state_dict, resolve_data, resolve_model
from .schema import to_dict
from .data.batches import sample_inputs
from .train import Trainer, evaluate, planned_steps

PLOTS_DIR = "plots"


@dataclass
class RunResult:
    """What a run produced: the compressed model, the report dict and the output folder (if any)."""

    model: nn.Module | None
    report: dict[str, Any]
    plugins: list[Plugin]
    out_dir: str | None = None


def _fingerprint(raw: Any) -> str:
    """Hash of what must not change between a checkpoint and its resume (length of training may)."""
    raw = raw or {}
    train = {k: v for k, v in (raw.get("train") or {}).items()
             if k in ("batch_size", "accumulate_grad_batches", "optimizer", "seed")}
    keep = {"model": raw.get("model"), "data": raw.get("data"), "stages": raw.get("stages"), "train": train}
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(recipe: Recipe, *, model: nn.Module | None = None, data: DataBundle | None = None,
        out_dir: str | None = None, resume: bool = False, raw: dict[str, Any] | None = None,
        collective: Collective | None = None) -> RunResult:
    """Resolve what the recipe names (unless given), :func:`prepare` its stages, train, finalise, write outputs.

    ``collective``: the ranks of a distributed run (:func:`compresskit.distributed.launch.connect`); embedding
    tables are then sharded table-wise (``distributed.sharding``), the rest is data-parallel, and rank 0 alone
    writes outputs. A recipe-built model with an ``out_dir`` may have its tables placed again once pruning has
    settled: the run is then built again and resumed from the checkpoint the trainer wrote
    (:mod:`compresskit.distributed.replacement`)."""
    coll = collective or Collective.single()
    coll.prefetch_ids = recipe.distributed.prefetch_ids
    built = model is None and recipe.model is not None   # from the recipe: its layout record can rebuild it
    # a recipe-built model in a table-wise run with a checkpoint folder can be built again with its tables placed
    # anew (distributed.replacement): the trainer then stops at a checkpoint and the loop below resumes from it
    coll.replace_tables = built and out_dir is not None and coll.distributed and \
        recipe.distributed.sharding == "table_wise" and recipe.distributed.replace_tables
    placement = recorded_placement(out_dir, coll) if resume else None
    replacements: list[dict[str, Any]] = []
    while True:
        started = time.perf_counter()
        compression, data, report = _build(recipe, model, data, out_dir, coll, placement)
        if replacements:
            replacements[-1]["rebuild_seconds"] = time.perf_counter() - started
        needs_training = recipe.train is not None and data is not None
        try:
            log_rows = _train(compression, recipe, data, out_dir, resume, raw, report) if needs_training else []
        except TablesReplaced as moved:
            replacements.append(moved.record())
            placement, resume = moved.owners, True
        else:
            break
        del compression        # (outside the except block: its traceback holds the old trainer and model)
        gc.collect()
    loaded = report.get("training", {}).pop("resume_seconds", 0.0)
    if replacements:   # training before each re-placement, building again and loading the checkpoint count too
        replacements[-1]["rebuild_seconds"] += loaded
        report["training"]["train_seconds"] += sum(r["train_seconds_before"] + r["rebuild_seconds"]
                                                   for r in replacements)
    model = compression.model
    if not needs_training and data is not None:
        report["training"] = {"test": evaluate(model, data.test, data.task, coll=coll, collate=data.collate)}
    model = compression.finalize()
    if needs_training and any(type(p).finalize is not Plugin.finalize for p in compression.plugins):
        report["training"]["final_test"] = evaluate(model, data.test, data.task, coll=coll, collate=data.collate)
    report.update(compression.report())
    report["run"]["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sent = report.get("training", {}).pop("sent_bytes_per_step", None)
    if coll.distributed:
        report["distributed"] = {**distributed_report(model, recipe, coll, sent), "replacements": replacements}
    if raw is not None:
        report["recipe"] = raw
    _write_outputs(model, recipe, data, report, compression, log_rows, out_dir, coll, built)
    return RunResult(model, report, compression.plugins, out_dir)


def _local_world() -> int:
    """Processes of this run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 when unset)."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _resolve(recipe: Recipe, model: nn.Module | None, data: DataBundle | None, out_dir: str | None,
             coll: Collective, placement: list[int] | None = None
             ) -> tuple[nn.Module | None, DataBundle | None, dict[str, torch.Tensor] | None]:
    """The run's model and data (those given, or what the recipe names), seeded and sharded (by ``placement``, one
    owner rank a table, when given: a re-placement or a resume records it), with the output folder ready. Returns
    (model, data, weights): ``weights`` is a ``model.checkpoint`` saved after its stages converted the model, to
    load once they have rebuilt that structure (None when it loaded into the plain model)."""
    train_cfg = recipe.train
    seed = train_cfg.seed if train_cfg else 0
    analysis_only = bool(recipe.stages) and all(s.plugin.kind == "analysis" for s in recipe.stages)
    weights, lazy = None, False
    with agreement(coll):   # local work only: a user error on any rank stops every rank with its message
        if out_dir is not None and coll.is_main:
            prepare_output_dir(out_dir)
        if train_cfg and train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        torch.manual_seed(seed)
        if data is None and recipe.data is not None:
            data = resolve_data(recipe.data, seed)
        if model is None and recipe.model is not None:
            # the built-in DLRM (one table collection, initialised by its own code) builds only this rank's tables,
            # and none at all for a lazy fiited stage (it makes lazy tables in their place: lazy_tables.py)
            own_build = recipe.model.name == "dlrm" and not recipe.model.checkpoint
            shard = own_build and coll.distributed and recipe.distributed.sharding == "table_wise"
            lazy = own_build and _lazy_stage(recipe)

            def place(sizes: list[int]) -> list[int]:
                if lazy:
                    return [-1] * len(sizes)              # no rank builds any table
                if placement is not None and len(placement) == len(sizes):
                    return list(placement)
                return place_tables(sizes, coll.world)     # (a placement that does not fit: sharding says so)
            with building_tables_for(place, coll.rank, _local_world()) if shard or lazy else contextlib.nullcontext():
                model = resolve_model(recipe.model, data.info if data is not None else None)
            if recipe.model.checkpoint:
                weights = read_state_dict(recipe.model.checkpoint)
                if set(weights) == set(model.state_dict()):
                    load_weights(model, weights, recipe.model.checkpoint)
                    weights = None
        if model is None and not analysis_only:
            raise ConfigError("model", "required field is missing (no model given to apply())")
        if coll.distributed and model is not None and recipe.distributed.sharding == "table_wise":
            try:
                shard_tables(model, coll, placement, unbuilt=lazy)
            except ValueError as e:
                raise ConfigError("distributed.sharding", str(e)) from None
    return model, data, weights


def _lazy_stage(recipe: Recipe) -> bool:
    """Whether a ``fiited`` stage of the recipe makes lazy tables (so the tables need not be built first)."""
    return any(stage.plugin.name == "fiited" and getattr(stage.config, "lazy", False) for stage in recipe.stages)


def _build(recipe: Recipe, model: nn.Module | None, data: DataBundle | None, out_dir: str | None,
           coll: Collective, placement: list[int] | None) -> tuple[Any, DataBundle | None, dict[str, Any]]:
    """The run's model and data resolved (:func:`_resolve`), its stages prepared and a ``model.checkpoint`` loaded:
    (compression, data, the report's first section)."""
    model, data, weights = _resolve(recipe, model, data, out_dir, coll, placement)
    steps = planned_steps(recipe.train, len(data.train)) if recipe.train is not None and data is not None else 0
    # plugins write their own files (HyPar's plan) from rank 0 only, like every other output
    compression = prepare(model, recipe, total_steps=steps, data=data,
                          sample_input=sample_inputs(data) if data is not None else None,
                          out_dir=out_dir if coll.is_main else None, collective=coll)
    model = compression.model
    if weights is not None:   # saved after its stages had converted it: they have rebuilt that structure now
        with agreement(coll):
            load_weights(model, weights, recipe.model.checkpoint)
    report: dict[str, Any] = {"run": {"model": recipe.model.name if recipe.model else
                                      (type(model).__name__ if model is not None else None),
                                      "data": recipe.data.name if recipe.data else None,
                                      "stages": ", ".join(p.name for p in compression.plugins) or "none"}}
    return compression, data, report


def _train(compression, recipe: Recipe, data: DataBundle, out_dir: str | None, resume: bool,
           raw: dict[str, Any] | None, report: dict[str, Any]) -> list[dict[str, float]]:
    """Train with the built-in loop (resuming from ``out_dir``'s checkpoint if asked); the training numbers go
    into ``report``. Returns the training log's rows."""
    trainer = Trainer(compression, data, recipe.train, out_dir, fingerprint=_fingerprint(raw),
                      logging_cfg=recipe.logging)
    with run_log(out_dir, recipe.logging.level, writer=compression.ctx.collective.is_main):
        started = time.perf_counter()
        if resume and not trainer.load_checkpoint():
            raise ConfigError("--resume", f"no checkpoint to resume from in '{out_dir}'")
        loaded = time.perf_counter() - started
        try:
            report["training"] = trainer.fit()
        except TablesReplaced as moved:
            moved.seconds += loaded if resume else 0.0     # a re-placement after a resume: its load counts too
            raise
        if resume:
            report["training"]["resume_seconds"] = loaded   # (run() takes it out of the report)
    return trainer.log.rows


def _write_outputs(model: nn.Module | None, recipe: Recipe, data: DataBundle | None, report: dict[str, Any],
                   compression, log_rows: list[dict[str, float]], out_dir: str | None, coll: Collective,
                   built: bool) -> None:
    """model.pt (gathered from every rank), layout.json (for a model the recipe built), report.json / .md / .html
    and the plots, written atomically by rank 0; nothing without ``out_dir``."""
    if not out_dir:
        return
    state = gather_state_dict(model, coll) if model is not None else None
    layout = run_layout(model, recipe, data, coll) if built else None
    figures = training_figures(log_rows) + compression.figures(log_rows) if recipe.logging.plots else []
    if coll.is_main:
        if model is not None:
            integrity.save(os.path.join(out_dir, "model.pt"), state)
        if layout is not None:
            write_layout(os.path.join(out_dir, LAYOUT_FILE), layout)
        write_json(os.path.join(out_dir, "report.json"), report)
        plots = write_plots(out_dir, report, figures)
        write_text(os.path.join(out_dir, "report.md"), render_markdown(report, plots=plots))


def write_plots(out_dir: str, report: dict[str, Any], figures: list[Figure]) -> list[tuple[str, str]]:
    """Render ``figures`` to ``out_dir/plots/<name>.png`` and write ``report.html`` with them inlined (with no
    figures: the tables only). Returns (title, relative path) of each PNG for report.md."""
    rendered = [(fig, render_png(fig)) for fig in figures]
    if rendered:
        os.makedirs(os.path.join(out_dir, PLOTS_DIR), exist_ok=True)
    for fig, png in rendered:
        write_bytes(os.path.join(out_dir, PLOTS_DIR, f"{fig.name}.png"), png)
    write_text(os.path.join(out_dir, "report.html"), render_html(report, rendered))
    return [(fig.title, f"{PLOTS_DIR}/{fig.name}.png") for fig, _ in rendered]


def run_layout(model: nn.Module, recipe: Recipe, data: DataBundle | None, coll: Collective) -> Layout | None:
    """The layout record of a model built from ``recipe`` (:mod:`compresskit.layout`): the factory with its full
    arguments and every module the stages put in, over all ranks (a sharded table is recorded by its owner).
    None on ranks other than the first."""
    records = module_records(model)
    if coll.distributed:
        parts = coll.gather_object(records)
        if parts is None:
            return None
        seen: set[str] = set()
        records = [r for part in parts for r in part if not (r.module in seen or seen.add(r.module))]
    args = check_model_config(recipe.model, data.info if data is not None else None)
    return Layout(recipe.model.name, args, records)


def gather_state_dict(model: nn.Module, coll: Collective) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (sharded tables gathered from their owners; the keys are those of
    the unsharded model); None on other ranks. A one-process run: ``model.state_dict()``."""
    state = model.state_dict()
    if not coll.distributed:
        return state
    # every state-dict entry of the sharded tables, extra state included (a FIITED table's generator states)
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, ShardedCollection))
    tables = {k for k in state if k.startswith(prefixes)}
    parts = coll.gather_object({k: v for k, v in state.items() if k in tables})
    if parts is None:
        return None
    merged = {k: v for k, v in state.items() if k not in tables}
    gathered = {k: v for part in parts for k, v in part.items()}
    order = {name: i for i, name in enumerate(coll.table_order)}

    def table_of(key: str) -> int:
        parts_ = key.split(".")
        for cut in range(len(parts_), 0, -1):
            if ".".join(parts_[:cut]) in order:
                return order[".".join(parts_[:cut])]
        return len(order)

    for key in sorted(gathered, key=table_of):   # stable: each table's keys keep their order
        merged[key] = gathered[key]
    return merged


def distributed_report(model: nn.Module, recipe: Recipe, coll: Collective, sent: dict[str, float] | None
                       ) -> dict[str, Any]:
    """Ranks, placement, per-rank bytes and peak RSS, the balance of the ranks' table bytes at the end (max over
    mean: 1 is even), and the bytes a step sent: counted against the model of
    :mod:`compresskit.distributed.comm_model`."""
    local = [name for name in coll.table_order if coll.local_tables and name in coll.local_tables]
    mods = dict(model.named_modules())
    owners, dims, id_bytes, sent_ahead = [], [], [], 0
    for m in model.modules():
        if isinstance(m, ShardedCollection):
            owners += m.feature_owners
            dims += m.feature_dims
            id_bytes += [m.id_bytes_per_bag] * len(m.feature_owners)
            sent_ahead = max(sent_ahead, m.prefetched_batches)
    ignored = set(sharded_names(model))
    dense_grad = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if p.requires_grad and n not in ignored)
    mine = {"rank": coll.rank, "tables": local,
            "table_bytes": sum(module_bytes(mods[name])["total"] for name in local),
            "model_bytes": module_bytes(model)["total"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sent_bytes_per_step": sent, "batches_sent_ahead": sent_ahead}
    if recipe.train is not None:
        mine["model_bytes_per_step"] = step_bytes(recipe.train.batch_size, coll.world, coll.rank, owners, dims,
                                                  dense_grad, recipe.train.accumulate_grad_batches,
                                                  sum(id_bytes) / len(id_bytes) if id_bytes else 8.0,
                                                  sent_ahead > 0)
    ranks = coll.all_gather_object(mine)
    return {"world": coll.world, "backend": coll.backend, "sharding": recipe.distributed.sharding,
            "table_bytes_max_over_mean": max_over_mean([r["table_bytes"] for r in ranks]),  # balance at the end
            "ranks": ranks}


def apply(model: nn.Module, recipe: str | dict[str, Any] | Recipe, data: DataBundle | None = None,
          out_dir: str | None = None) -> RunResult:
    """Apply a recipe (file path, dict or Recipe) to an existing ``nn.Module`` and train it with the built-in
    trainer (for your own training loop use :func:`compresskit.prepare`).

    ``data`` overrides the recipe's dataset; without data (and no ``data`` section) stages are applied and
    finalised with no training. Nothing is written unless ``out_dir`` is given.
    """
    if isinstance(recipe, str):
        rec, raw = load_recipe(recipe, require_model=False)
    elif isinstance(recipe, dict):
        rec, raw = validate_recipe(recipe), recipe
    elif isinstance(recipe, Recipe):  # one built or edited in Python may hold raw stages or bad values
        raw = to_dict(recipe)
        rec = recipe if is_validated(recipe) else validate_recipe(raw)
    else:
        raise ConfigError("recipe", f"expected a path, dict or Recipe, got {type(recipe).__name__}")
    return run(rec, model=model, data=data, out_dir=out_dir, raw=raw)
