"""``compresskit plan``: HyPar from a recipe or straight from flags. The HyPar plugin adds this subcommand
(:meth:`HyparPlugin.add_commands`); the core CLI knows nothing of it."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ...errors import ConfigError

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
    p.add_argument("--out", help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (stages.0.search=joint); repeatable")
    p.set_defaults(func=plan_command)
    return p


def _base_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe to plan from: the file, or a one-stage recipe for --model."""
    from ...recipe import read_yaml
    from .graph import NETWORKS

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
        raw = {"model": {"name": args.model}, "stages": [{"plugin": "hypar", "input_shape": [3, 32, 32]}]}
    raw["output"] = {"dir": os.path.join("runs", f"hypar-{args.model.lower()}")}
    return raw


def flag_overrides(args: argparse.Namespace, n_stages: int) -> list[str]:
    """--accelerators/--batch/--dtype as ``stages.<i>.<field>=<value>`` overrides, one per given flag per stage."""
    return [f"stages.{i}.{field}={getattr(args, flag)}" for i in range(n_stages)
            for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None]


def plan_command(args: argparse.Namespace) -> int:
    """Plan from ``args.recipe`` (its hypar stages) or from --model; write the report and print a summary.

    Order: the recipe (or the --model recipe), then --set (indices of the recipe's own stages), then only the hypar
    stages are kept (no training), then the flags as overrides of those stages, then validation and the run."""
    from ...api import run
    from ...recipe import apply_overrides, validate_recipe
    from .report import summary

    raw = apply_overrides(_base_recipe(args), args.set or [])
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    hypar = [s for s in stages if isinstance(s, dict) and s.get("plugin") == "hypar"]
    if not hypar:
        raise ConfigError("stages", "the recipe has no 'hypar' stage to plan")
    raw["stages"] = hypar
    raw.pop("train", None)
    raw = apply_overrides(raw, flag_overrides(args, len(hypar)))
    recipe = validate_recipe(raw)
    out_dir = args.out or recipe.output.dir
    result = run(recipe, out_dir=out_dir, raw=raw)
    for plugin in result.plugins:
        print(summary(plugin.plan))
    print(f"wrote {out_dir}/plan.md, plan.html, comm_per_layer.png, plan.json")
    return 0
