"""Command line: ``compresskit apply|validate|plugins|export`` plus the subcommands plugins add (HyPar's ``plan``).

User errors print one line and exit with 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import CompressKitError, ConfigError, first_line, one_line


def _cmd_apply(args: argparse.Namespace) -> int:
    from .distributed import launched_world

    if args.nproc > 1 and launched_world() == 1:
        from .distributed.launch import launch

        return launch(_without_nproc(sys.argv[1:] if args.argv is None else args.argv), args.nproc)
    if launched_world() > 1:
        return _apply_on_rank(args)
    return _apply(args)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _apply(args: argparse.Namespace, collective=None, loaded=None) -> int:
    from .atomic import prepare_output_dir
    from .recipe import load_recipe

    recipe, raw = loaded or load_recipe(args.recipe, args.set)
    out_dir = args.out or recipe.output.dir
    if collective is None:   # before anything slow; a distributed run checks it on rank 0, inside its agreement
        prepare_output_dir(out_dir)
    try:
        result = run_recipe(recipe, raw, out_dir, resume=args.resume, collective=collective)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint is in {out_dir}; continue with "
              f"`compresskit apply {args.recipe} --resume`", file=sys.stderr)
        return 130
    if collective is not None and not collective.is_main:
        return 0
    test = result.report.get("training", {}).get("final_test") or result.report.get("training", {}).get("test")
    if test:
        print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()))
    written = (["model.pt"] if result.model is not None else []) + \
        [name for name in ("report.json", "report.md", "report.html", "train_log.csv", "plots/", "tensorboard/")
         if os.path.exists(os.path.join(out_dir, name))]
    print(f"wrote {out_dir}/" + ", ".join(written))
    return 0


def run_recipe(recipe, raw: dict, out_dir: str | None, *, model=None, resume: bool = False, collective=None):
    """The one way a command runs a validated recipe: :func:`compresskit.api.run` with the recipe's console
    logging (on the first rank). ``compresskit apply`` calls it, and plugin subcommands get it as
    ``args.run_recipe`` (so a plugin never imports the runner above it). Returns the RunResult."""
    from contextlib import nullcontext

    from .api import run
    from .logs import console_log

    with console_log(recipe.logging.console) if collective is None or collective.is_main else nullcontext():
        return run(recipe, model=model, out_dir=out_dir, resume=resume, raw=raw, collective=collective)


# set once this process has joined a torchrun launch: main then ends it with os._exit (see main)
_RANK_PROCESS = [False]


def _apply_on_rank(args: argparse.Namespace) -> int:
    """One rank of a torchrun launch: join it, agree on the recipe, run; errors name the rank."""
    import hashlib
    import json

    from .distributed.launch import (LOST_CONTACT, STOPPED, RankStopped, agreement, connect, disconnect,
                                     same_everywhere)
    from .recipe import DistributedConfig, load_recipe

    loaded, problem = None, None
    try:
        loaded = load_recipe(args.recipe, args.set)
    except CompressKitError as e:
        problem = e
    coll = connect(loaded[0].distributed if loaded else DistributedConfig())
    _RANK_PROCESS[0] = True
    try:
        with agreement(coll):
            if problem is not None:
                raise problem
        same_everywhere(coll, hashlib.sha256(json.dumps(loaded[1], sort_keys=True, default=str).encode())
                        .hexdigest(), "recipe (file and --set overrides)")
        return _apply(args, coll, loaded)
    except RankStopped as e:
        print(f"error: rank {coll.rank}: {e}; resume with --resume", file=sys.stderr)
        return STOPPED
    except RuntimeError as e:
        if not _raised_by_collective(e):
            raise
        first = first_line(e, 200)
        print(f"error: rank {coll.rank}: lost contact with another rank ({first}); the last checkpoint is in "
              f"{args.out or loaded[0].output.dir}; resume with --resume", file=sys.stderr)
        return LOST_CONTACT
    finally:   # leaving the group cleanly: exiting with its threads running aborts the process
        disconnect(coll)


def _raised_by_collective(error: BaseException) -> bool:
    """Whether ``error`` came out of a torch.distributed call (a peer died, or a collective timed out)."""
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"torch{os.sep}distributed{os.sep}" in last


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


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    done = export_run(args.run_dir, args.format, args.out)
    for row in done.get("tables", []):
        kind = f"packed {row['storage']}" if row["packed"] else "dense"
        cache = f" + cache {row['cache_bytes']:,}" if row["cache_bytes"] else ""
        print(f"  {row['module']}: {kind} values {row['values_bytes']:,}{cache} + index {row['index_bytes']:,} = "
              f"{row['total_bytes']:,} bytes (dense {row['dense_bytes']:,})")
    if done.get("tables"):
        b = done["bytes"]
        ratio = f" = {b['ratio']:.4f} of the dense tables" if b["ratio"] is not None else ""
        cache = f" + cache {b['cache']:,}" if b["cache"] else ""
        print(f"tables: values {b['values']:,}{cache} + index {b['index']:,} = {b['total']:,} bytes{ratio} "
              f"({b['dense']:,} bytes dense)")
    notes = []
    if done.get("fits_original"):
        notes.append("loads with strict=True into the recipe's model" if args.format == "state-dict" else
                     "load_packed fits it into the recipe's model")
    if "dynamic_batch" in done:
        notes.append("batch dimension dynamic" if done["dynamic_batch"] else
                     f"batch dimension fixed at {done['rows']} (the model did not trace with a dynamic one)")
    if done["max_abs_diff"] is not None:
        notes.append(f"max |difference| from the run's model on {done['rows']} test rows: {done['max_abs_diff']:.3g}")
    else:
        notes.append("not compared with the run's model (no sample batch: the run's data names none or is not "
                     "found here)")
    files = f"{done['path']} (+ .sha256)"
    if "spec" in done:
        files += f" and {done['spec']}"
    print(f"wrote {files}: {done['file_bytes']:,} bytes" + "".join(f"; {n}" for n in notes))
    return 0


def _cmd_check_export(args: argparse.Namespace) -> int:
    from .export import check_export

    done = check_export(args.run_dir, args.file)
    print(f"{done['path']}: {done['format']} loaded; max |difference| from the run's model on {done['rows']} test "
          f"rows: {done['max_abs_diff']:.3g}")
    return 0


def _one_line_errors(parser: argparse.ArgumentParser, where: str) -> None:
    """Make ``parser`` report a usage mistake (unknown choice, missing argument) as a one-line ConfigError."""
    def error(message: str) -> None:
        raise ConfigError(where, message)

    parser.error = error  # type: ignore[method-assign]


CORE_COMMANDS = ("apply", "validate", "plugins", "export", "check-export")


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    """The argparse parser for the core's subcommands and (``with_plugins``) every plugin's."""
    parser = argparse.ArgumentParser(prog="compresskit", description="PyTorch model compression toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="run a recipe: build, compress, train, report")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--out", help="output folder (overrides output.dir)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run on N local processes through torch.distributed.run (torchrun --standalone)")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("validate", help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plugins", help="list plugins and their config fields")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("export", help="export a run's compressed model for serving (docs/export.md)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of compresskit apply (model.pt, report.json)")
    p.add_argument("--format", required=True, choices=("state-dict", "packed", "torch.export"),
                   help="state-dict: standard modules for the original architecture; packed: compact FIITED "
                        "tables + JSON spec (compresskit.export.load_packed); torch.export: a .pt2 program")
    p.add_argument("--out", metavar="PATH", help="file (or folder) to write (default: in RUN_DIR)")
    p.set_defaults(func=_cmd_export)
    _one_line_errors(p, "export")
    p = sub.add_parser("check-export", help="load an exported file as a server would and compare it with the run")
    p.add_argument("run_dir", help="the output folder of the compresskit apply run it was exported from")
    p.add_argument("file", help="model.pt2, model_packed.pt (its .json spec beside it) or model_dense.pt")
    p.set_defaults(func=_cmd_check_export)
    _one_line_errors(p, "check-export")

    if not with_plugins:
        return parser
    from .registry import available_plugins

    for name, plugin in available_plugins().items():
        try:
            plugin.add_commands(sub)
        except argparse.ArgumentError as e:
            raise ConfigError(f"plugin {name}", f"cannot add its commands: {e}") from None
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compresskit`` console script.

    A process that joined a torchrun launch does not return: once its outputs are written and its message printed,
    it flushes and ends with ``os._exit`` (gloo leaves a thread behind that aborts interpreter shutdown with
    SIGABRT about once in 20 runs, even after ``destroy_process_group``)."""
    code = _main(argv)
    if _RANK_PROCESS[0]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        given = list(sys.argv[1:] if argv is None else argv)
        # a core command is parsed without loading the plugins (their imports take seconds): a recipe's own
        # problems are reported before torch is imported
        args = build_parser(with_plugins=not given or given[0] not in CORE_COMMANDS).parse_args(argv)
        args.argv = list(argv) if argv is not None else None
        args.run_recipe = run_recipe
        return args.func(args)
    except CompressKitError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
