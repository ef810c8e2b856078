"""``compresskit plan``: HyPar from a recipe or straight from flags."""
from __future__ import annotations

import argparse
import os

from ...errors import ConfigError


def plan_command(args: argparse.Namespace) -> int:
    """Plan from ``args.recipe`` (its hypar stage) or from --model/--accelerators/--batch; write the report."""
    from ...api import run
    from ...recipe import apply_overrides, read_yaml, validate_recipe

    flags = {"accelerators": args.accelerators, "batch": args.batch, "dtype": args.dtype}
    if args.recipe:
        raw = read_yaml(args.recipe)
        if not isinstance(raw, dict):
            raise ConfigError("recipe", f"'{args.recipe}' must hold a mapping")
    else:
        if not args.model:
            raise ConfigError("plan", "give a recipe or --model (a paper network such as vgg-e, or a model name)")
        from .graph import PAPER_NETWORKS

        if args.model.lower() in PAPER_NETWORKS:
            raw = {"stages": [{"plugin": "hypar", "network": args.model}]}
        else:
            raw = {"model": {"name": args.model}, "stages": [{"plugin": "hypar", "input_shape": [3, 32, 32]}]}
        raw["output"] = {"dir": os.path.join("runs", f"hypar-{args.model.lower()}")}
    raw = apply_overrides(raw, args.set or [])
    hypar_stages = [s for s in raw.get("stages", []) if isinstance(s, dict) and s.get("plugin") == "hypar"]
    if not hypar_stages:
        raise ConfigError("stages", "the recipe has no 'hypar' stage to plan")
    for stage in hypar_stages:
        stage.update({k: v for k, v in flags.items() if v is not None})
    raw["stages"] = hypar_stages
    raw.pop("train", None)
    recipe, stages = validate_recipe(raw)
    out_dir = args.out or recipe.output.dir
    result = run(recipe, stages, out_dir=out_dir, raw=raw)
    for plugin in result.plugins:
        p = plugin.plan
        print(f"{p['title']}: {p['accelerators']} accelerators, batch {p['batch']}: HyPar moves "
              f"{p['total_bytes']['hypar'] / 2**20:.1f} MiB per step; "
              + ", ".join(f"{k} {v:.2f}x" for k, v in p["ratio_vs_hypar"].items()))
    print(f"wrote {out_dir}/plan.md, plan.html, comm_per_layer.png, plan.json")
    return 0
