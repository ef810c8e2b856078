"""Running recipes: the Python API (:func:`apply`) and the engine behind ``compresskit apply``."""
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
from .metrics import module_bytes
from .plugin import Plugin, RunContext
from .recipe import Recipe, Stage, load_recipe, validate_recipe
from .report import render_markdown
from .resolve import resolve_data, resolve_model
from .schema import to_dict
from .train import Trainer, batches, evaluate


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
             if k in ("batch_size", "optimizer", "seed")}
    keep = {"model": raw.get("model"), "data": raw.get("data"), "stages": raw.get("stages"), "train": train}
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(recipe: Recipe, stages: list[Stage], *, model: nn.Module | None = None, data: DataBundle | None = None,
        out_dir: str | None = None, resume: bool = False, raw: dict[str, Any] | None = None) -> RunResult:
    """Resolve what the recipe names (unless given), apply each stage, train, finalise and write the outputs."""
    train_cfg = recipe.train
    seed = train_cfg.seed if train_cfg else 0
    if train_cfg and train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(seed)
    if data is None and recipe.data is not None:
        data = resolve_data(recipe.data, seed)
    analysis_only = bool(stages) and all(s.plugin.kind == "analysis" for s in stages)
    if model is None and recipe.model is not None:
        model = resolve_model(recipe.model, data.info if data is not None else None)
    if model is None and not analysis_only:
        raise ConfigError("model", "required field is missing (no model given to apply())")
    sample = None
    if data is not None:
        sample = next(batches(data.test, 8))[0]
    ctx = RunContext(model=model, data=data, train=train_cfg, out_dir=out_dir, sample_input=sample)
    plugins = [stage.plugin(stage.config) for stage in stages]
    for plugin in plugins:
        model = plugin.apply(model, ctx)
        ctx.model = model

    model_name = recipe.model.name if recipe.model else (type(model).__name__ if model is not None else None)
    report: dict[str, Any] = {"run": {"model": model_name,
                                      "data": recipe.data.name if recipe.data else None,
                                      "stages": ", ".join(p.name for p in plugins) or "none"}}
    needs_training = train_cfg is not None and data is not None
    if needs_training:
        ctx.extras["fingerprint"] = _fingerprint(raw)
        trainer = Trainer(model, data, train_cfg, plugins, ctx, out_dir)
        if resume:
            if not trainer.load_checkpoint():
                raise ConfigError("--resume", f"no checkpoint to resume from in '{out_dir}'")
        report["training"] = trainer.fit()
    elif data is not None:
        report["training"] = {"test": evaluate(model, data.test, data.task)}
    for plugin in plugins:
        model = plugin.finalize(model, ctx)
        ctx.model = model
    if data is not None and needs_training and any(type(p).finalize is not Plugin.finalize for p in plugins):
        report["training"]["final_test"] = evaluate(model, data.test, data.task)
    if model is not None:
        report["memory"] = module_bytes(model)
    report["stages"] = [{"plugin": p.name, "config": to_dict(p.config), **p.report(ctx)} for p in plugins]
    if raw is not None:
        report["recipe"] = raw
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if model is not None:
            torch_save(os.path.join(out_dir, "model.pt"), model.state_dict())
        write_json(os.path.join(out_dir, "report.json"), report)
        write_text(os.path.join(out_dir, "report.md"), render_markdown(report))
    return RunResult(model, report, plugins, out_dir)


def apply(model: nn.Module, recipe: str | dict[str, Any] | Recipe, data: DataBundle | None = None,
          out_dir: str | None = None) -> RunResult:
    """Apply a recipe (file path, dict or Recipe) to an existing ``nn.Module``.

    ``data`` overrides the recipe's dataset; without data (and no ``data`` section) stages are applied and
    finalised with no training. Nothing is written unless ``out_dir`` is given.
    """
    if isinstance(recipe, str):
        rec, stages, raw = load_recipe(recipe, require_model=False)
    elif isinstance(recipe, dict):
        rec, stages = validate_recipe(recipe)
        raw = recipe
    elif isinstance(recipe, Recipe):
        rec, stages = validate_recipe(to_dict(recipe))
        raw = to_dict(recipe)
    else:
        raise ConfigError("recipe", f"expected a path, dict or Recipe, got {type(recipe).__name__}")
    return run(rec, stages, model=model, data=data, out_dir=out_dir, raw=raw)
