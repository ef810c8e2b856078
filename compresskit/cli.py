"""Command line: ``compresskit apply|validate|plugins`` plus the subcommands plugins add (HyPar's ``plan``).

User errors print one line and exit with 2."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import CompressKitError, ConfigError


def _cmd_apply(args: argparse.Namespace) -> int:
    from .api import run
    from .recipe import load_recipe

    recipe, raw = load_recipe(args.recipe, args.set)
    out_dir = args.out or recipe.output.dir
    try:
        result = run(recipe, out_dir=out_dir, resume=args.resume, raw=raw)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint is in {out_dir}/checkpoint.pt; continue with "
              f"`compresskit apply {args.recipe} --resume`", file=sys.stderr)
        return 130
    test = result.report.get("training", {}).get("final_test") or result.report.get("training", {}).get("test")
    if test:
        print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    written = (["model.pt"] if result.model is not None else []) + ["report.json", "report.md"]
    print(f"wrote {out_dir}/" + ", ".join(written))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, args.set)
    names = ", ".join(s.plugin.name for s in recipe.stages) or "no stages"
    print(f"{args.recipe}: OK ({names})")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import available_plugins
    from .schema import fields_help

    for name, cls in available_plugins().items():
        print(f"{name} ({cls.kind}): {cls.description}")
        for row in fields_help(cls.Config):
            print(f"    {row['name']}: {row['type']} = {row['default']}  -- {row['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for the core's subcommands and every plugin's."""
    from .registry import available_plugins

    parser = argparse.ArgumentParser(prog="compresskit", description="PyTorch model compression toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="run a recipe: build, compress, train, report")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--out", help="output folder (overrides output.dir)")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plugins", help="list plugins and their config fields")
    p.set_defaults(func=_cmd_plugins)

    for name, plugin in available_plugins().items():
        try:
            plugin.add_commands(sub)
        except argparse.ArgumentError as e:
            raise ConfigError(f"plugin {name}", f"cannot add its commands: {e}") from None
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compresskit`` console script."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CompressKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
