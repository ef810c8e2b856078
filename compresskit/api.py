"""Running recipes with the built-in trainer: :func:`apply` (Python) and :func:`run` (``compresskit apply``), both
on the one engine, :func:`compresskit.prepare`."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .atomic import torch_save, write_json, write_text
from .data import DataBundle
from .errors import ConfigError
from .compression import SAMPLE_ROWS, prepare
from .plugin import Plugin
from .recipe import Recipe, load_recipe, validate_recipe
from .report import render_markdown
from .resolve import resolve_data, resolve_model
from .schema import to_dict
from .train import Trainer, batches, evaluate, planned_steps


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
        out_dir: str | None = None, resume: bool = False, raw: dict[str, Any] | None = None) -> RunResult:
    """Resolve what the recipe names (unless given), :func:`prepare` its stages, train, finalise, write outputs."""
    train_cfg = recipe.train
    seed = train_cfg.seed if train_cfg else 0
    if train_cfg and train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(seed)
    if data is None and recipe.data is not None:
        data = resolve_data(recipe.data, seed)
    analysis_only = bool(recipe.stages) and all(s.plugin.kind == "analysis" for s in recipe.stages)
    if model is None and recipe.model is not None:
        model = resolve_model(recipe.model, data.info if data is not None else None)
    if model is None and not analysis_only:
        raise ConfigError("model", "required field is missing (no model given to apply())")
    sample = next(batches(data.test, SAMPLE_ROWS))[0] if data is not None else None
    needs_training = train_cfg is not None and data is not None
    steps = planned_steps(train_cfg, len(data.train)) if needs_training else 0
    compression = prepare(model, recipe, total_steps=steps, data=data, sample_input=sample, out_dir=out_dir)
    model = compression.model
    report: dict[str, Any] = {"run": {"model": recipe.model.name if recipe.model else
                                      (type(model).__name__ if model is not None else None),
                                      "data": recipe.data.name if recipe.data else None,
                                      "stages": ", ".join(p.name for p in compression.plugins) or "none"}}
    if needs_training:
        trainer = Trainer(compression, data, train_cfg, out_dir, fingerprint=_fingerprint(raw))
        if resume and not trainer.load_checkpoint():
            raise ConfigError("--resume", f"no checkpoint to resume from in '{out_dir}'")
        report["training"] = trainer.fit()
    elif data is not None:
        report["training"] = {"test": evaluate(model, data.test, data.task)}
    model = compression.finalize()
    if needs_training and any(type(p).finalize is not Plugin.finalize for p in compression.plugins):
        report["training"]["final_test"] = evaluate(model, data.test, data.task)
    report.update(compression.report())
    if raw is not None:
        report["recipe"] = raw
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if model is not None:
            torch_save(os.path.join(out_dir, "model.pt"), model.state_dict())
        write_json(os.path.join(out_dir, "report.json"), report)
        write_text(os.path.join(out_dir, "report.md"), render_markdown(report))
    return RunResult(model, report, compression.plugins, out_dir)


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
    elif isinstance(recipe, Recipe):  # re-validated: a Recipe built in Python may hold raw stages or bad values
        raw = to_dict(recipe)
        rec = validate_recipe(raw)
    else:
        raise ConfigError("recipe", f"expected a path, dict or Recipe, got {type(recipe).__name__}")
    return run(rec, model=model, data=data, out_dir=out_dir, raw=raw)
