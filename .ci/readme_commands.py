"""The newcomer check: run every command of the README's ``bash`` code blocks that needs no downloaded data, in
order, in a scratch folder holding the recipes and the sample data, and fail (exit 1) naming the first that does not exit 0.

Skipped, each for its reason: ``pip install`` (CI has installed the package and its extras already), the test
command (CI runs it), ``python benchmarks/...`` (hours of measurement; ``render_docs.py --check`` runs instead) and
any command naming a recipe or path whose data is not bundled (``movielens``, ``data.path``).

    python .ci/readme_commands.py [--list]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"```bash\n(.*?)```", re.DOTALL)
NEEDS_DATA = ("movielens", "data.path", "ml-100k", "criteo", "adult")


def commands(readme: str) -> list[str]:
    """Every command line of the README's ``bash`` blocks, comments stripped, ``&&`` chains split."""
    out = []
    for block in FENCE.findall(readme):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def why_skipped(command: str) -> str | None:
    """Why ``command`` is not run here, or None when it must run."""
    if command.startswith("pip install"):
        return "installation: CI installs the package and its extras first"
    if command.startswith("python -m pytest"):
        return "the test command: CI runs it"
    if command.startswith("python benchmarks/") and not command.startswith("python benchmarks/render_docs.py"):
        return "a benchmark: hours of measurement"
    if any(word in command.lower() for word in NEEDS_DATA):
        return "needs a downloaded dataset"
    return None


def run(command: str, cwd: str) -> tuple[int, float, str]:
    """Exit status, seconds and the last lines of output of one README command run in ``cwd``."""
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == sys.executable and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        argv[1] = os.path.join(ROOT, argv[1])
        if argv[1].endswith("render_docs.py"):   # check, never rewrite, the checkout's docs
            argv.append("--check")
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
    return done.returncode, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="only list what would run and what is skipped")
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = commands(f.read())
    with tempfile.TemporaryDirectory(prefix="readme-") as scratch:
        shutil.copytree(os.path.join(ROOT, "recipes"), os.path.join(scratch, "recipes"))
        shutil.copytree(os.path.join(ROOT, "examples", "data"), os.path.join(scratch, "examples", "data"))
        for command in found:
            reason = why_skipped(command)
            if reason or args.list:
                print(f"{'skip' if reason else 'run '}  {command}" + (f"  ({reason})" if reason else ""), flush=True)
                continue
            code, seconds, tail = run(command, scratch)
            print(f"{'ok  ' if code == 0 else 'FAIL'}  {command}  ({seconds:.0f} s)", flush=True)
            if code != 0:
                print(tail, file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
