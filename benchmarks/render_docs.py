"""Render every benchmark number README.md and docs/ quote from ``benchmarks/results/*.json``.

A generated part of a document sits between ``<!-- render: NAME -->`` and ``<!-- /render -->``; ``NAME`` is one
of the renderers in ``benchmarks/rendering/`` (a table, or a sentence inside a paragraph). Each table ends with where its numbers
come from: the results file, its date, machine, thread count, torch version and commit.

    python benchmarks/render_docs.py            # rewrite every generated part from the JSON
    python benchmarks/render_docs.py --check    # exit 1 naming each part that differs (the test suite runs this)

After a benchmark run, rerun this and commit the JSON and the docs together.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT  # noqa: E402
from rendering import RENDERERS  # noqa: E402

DOCUMENTS = ["README.md", "docs/fiited.md", "docs/dasnet.md", "docs/hypar.md", "docs/distributed.md"]
BLOCK = re.compile(r"<!-- render: ([a-z0-9-]+) -->(.*?)<!-- /render -->", re.DOTALL)


def render(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every generated part rendered again; the names of the parts that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in RENDERERS:
            raise SystemExit(f"{where}: unknown render block '{name}' (known: {', '.join(sorted(RENDERERS))})")
        new = RENDERERS[name]()
        if new != match.group(2):
            changed.append(name)
        return f"<!-- render: {name} -->{new}<!-- /render -->"

    return BLOCK.sub(replace, text), changed


def used_blocks() -> dict[str, list[str]]:
    """The render block names of each document."""
    out = {}
    for doc in DOCUMENTS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            out[doc] = [m.group(1) for m in BLOCK.finditer(f.read())]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the parts that differ (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCUMENTS:
        path = os.path.join(ROOT, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, changed = render(text, doc)
        stale += [f"{doc}: {name}" for name in changed]
        if changed and not args.check:
            from compresskit.atomic import write_text

            write_text(path, new)
    if args.check and stale:
        print("out of date with benchmarks/results (run python benchmarks/render_docs.py):\n  " + "\n  ".join(stale))
        return 1
    print("\n".join(f"rendered {s}" for s in stale) or "every generated part is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
