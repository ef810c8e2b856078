"""``compresskit plan``: HyPar from a recipe or straight from flags. The HyPar plugin adds this subcommand
(:meth:`HyparPlugin.add_commands`); the core CLI knows nothing of it."""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

from ...errors import ConfigError, shorten

# flag -> HyparConfig field; each given flag becomes a ``stages.<i>.<field>=<value>`` override like --set
FLAG_FIELDS = {"accelerators": "accelerators", "batch": "batch", "dtype": "dtype"}


def add_plan_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``compresskit`` subcommands."""
    p = subparsers.add_parser("plan", help="HyPar: plan layer-wise parallelism and write the planner report")
    p.add_argument("recipe", nargs="?", help="recipe with a hypar stage")
    p.add_argument("--model", help="paper network (e.g. vgg-e) or model name")
    p.add_argument("--accelerators", type=int, help="number of accelerators (a power of two)")
    p.add_argument("--batch", type=int, help="global batch size")
    p.add_argument("--dtype", help="element type for bytes (float32, float16, bfloat16)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="one sample's input shape without the batch dim, to trace --model (default: the model's "
                        "own input_shape attribute)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--export", metavar="PLAN.json",
                   help="also write the plan with its per-module placements (DTensor names on a (2,)*h mesh)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (stages.0.search=joint); repeatable")
    p.set_defaults(func=plan_command)
    return p


def _base_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe to plan from: the file, or a one-stage recipe for --model."""
    from ...recipe import read_yaml
    from .chain import NETWORKS

    if args.recipe:
        raw = read_yaml(args.recipe)
        if raw is None:
            raise ConfigError("recipe", f"'{args.recipe}' is empty")
        if not isinstance(raw, dict):
            raise ConfigError("recipe", f"'{args.recipe}' must hold a mapping at top level, got {type(raw).__name__}")
        return raw
    if not args.model:
        raise ConfigError("plan", "give a recipe or --model (a paper network such as vgg-e, or a model name)")
    if args.model.lower() in NETWORKS:
        raw = {"stages": [{"plugin": "hypar", "network": args.model}]}
    else:
        from ...models import available_models
        from ...registry import unknown_name

        models = available_models()
        if ":" not in args.model and args.model not in models:   # neither: one did-you-mean over both lists
            raise unknown_name("network or model", args.model, [*NETWORKS, *models], "--model",
                               "'pkg.module:factory' or 'torchvision:<name>'")
        raw = {"model": {"name": args.model}, "stages": [{"plugin": "hypar"}]}
    raw["output"] = {"dir": os.path.join("runs", f"hypar-{args.model.lower()}")}
    return raw


def parse_input_shape(text: str) -> list[int]:
    """``--input-shape`` text (``3,32,32``: positive ints, comma-separated, no batch dim) as a list of ints."""
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", p) and int(p) > 0 for p in parts):
        raise ConfigError("--input-shape", f"got {shorten(text)}, expected positive integers separated by commas: "
                                           f"one sample's shape without the batch dim, e.g. 3,32,32")
    return [int(p) for p in parts]


def _declared_shape(model: Any) -> list[int] | None:
    """The model's own ``input_shape`` attribute (one sample, no batch dim), if it declares a valid one."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and d > 0 for d in shape):
        return list(shape)
    return None


def _model_and_shape(raw: dict[str, Any], hypar: list[dict[str, Any]], from_recipe: bool) -> Any:
    """Build the recipe's model when a hypar stage must trace it with no data and no ``input_shape``, and give
    those stages the model's declared ``input_shape``; ConfigError asking for --input-shape when it has none.
    Returns the model built (``None`` when nothing needed building)."""
    from ...recipe import validate_recipe
    from ...resolve import resolve_model

    needs = [s for s in hypar if not s.get("network") and s.get("input_shape") is None]
    if not needs or raw.get("model") is None or raw.get("data") is not None:
        return None
    model = resolve_model(validate_recipe(raw).model)
    shape = _declared_shape(model)
    if shape is None:
        also = " (or input_shape: [3, 32, 32] in the recipe's hypar stage)" if from_recipe else ""
        raise ConfigError("--input-shape", f"needed to trace {type(model).__name__}, which declares no input_shape: "
                                           f"give one sample's shape without the batch dim, e.g. --input-shape "
                                           f"3,32,32{also}")
    for stage in needs:
        stage["input_shape"] = shape
    return model


def flag_overrides(args: argparse.Namespace, n_stages: int) -> list[str]:
    """--accelerators/--batch/--dtype as ``stages.<i>.<field>=<value>`` overrides, one per given flag per stage."""
    return [f"stages.{i}.{field}={getattr(args, flag)}" for i in range(n_stages)
            for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None]


def plan_command(args: argparse.Namespace) -> int:
    """Plan from ``args.recipe`` (its hypar stages) or from --model; write the report and print a summary.

    Order: the recipe (or the --model recipe), then --set (indices of the recipe's own stages), then only the hypar
    stages are kept (no training), then the flags as overrides of those stages, then validation and the run."""
    from ...recipe import apply_overrides, expand_environment, validate_recipe
    from .report import summary

    raw = expand_environment(apply_overrides(_base_recipe(args), args.set or []))
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    hypar = [s for s in stages if isinstance(s, dict) and s.get("plugin") == "hypar"]
    if not hypar:
        raise ConfigError("stages", "the recipe has no 'hypar' stage to plan")
    raw["stages"] = hypar
    raw.pop("train", None)
    raw = apply_overrides(raw, flag_overrides(args, len(hypar)))
    hypar = raw["stages"]
    if args.input_shape is not None:
        shape = parse_input_shape(args.input_shape)
        for stage in hypar:
            stage["input_shape"] = shape
    model = _model_and_shape(raw, hypar, bool(args.recipe))
    recipe = validate_recipe(raw)
    out_dir = args.out or recipe.output.dir
    try:
        result = args.run_recipe(recipe, raw, out_dir, model=model)
    except ConfigError as e:   # name the flag the shape or model came from, not the recipe field the CLI filled in
        what = e.message
        if e.path == "model" and args.model:                     # untraceable
            raise ConfigError("--model", what) from None
        shape_flag = "--input-shape" if args.input_shape else "--model" if model is not None else None
        if shape_flag is None or not re.fullmatch(r"stages\[\d+\]\.input_shape", e.path):
            raise
        raise ConfigError(shape_flag, f"{what}; give --input-shape the shape of one sample without the batch "
                                      f"dim") from None
    exported = []
    for i, plugin in enumerate(result.plugins):
        print(summary(plugin.plan))
        if args.export:
            stem, ext = os.path.splitext(args.export)
            exported.append(plugin.plan.export(args.export if i == 0 else f"{stem}.{i}{ext}"))
    print(f"wrote {out_dir}/plan.md, plan.html, comm_per_layer.png, plan.json" +
          "".join(f", {p}" for p in exported))
    return 0
