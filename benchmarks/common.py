"""Shared benchmark plumbing: locating ../shared/data, timing with ``torch.utils.benchmark``, writing results,
printing tables."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils import benchmark

from compresskit.atomic import write_json
from compresskit.report import text_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def shared_data(*parts: str) -> str:
    """Path under the shared data folder (``$COMPRESSKIT_DATA`` or ../shared/data beside the repo)."""
    base = os.environ.get("COMPRESSKIT_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
    return os.path.join(base, *parts)


def environment() -> dict[str, Any]:
    """Where the numbers were taken: versions, thread and CPU count, CPU model, date and the code's commit
    (``render_docs.py`` prints it under every table)."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "commit": commit()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture where that is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def commit() -> str:
    """The repository's commit, ``+changes`` when files differ from it; ``unknown`` outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def timer(fn: Callable[..., Any], *args: Any, label: str = "") -> benchmark.Timer:
    """A ``torch.utils.benchmark.Timer`` of ``fn(*args)`` at the process's thread count (the Timer's own default is
    one thread, which would time something other than what the process runs)."""
    return benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads(),
                           label=label)


def interleaved_medians_ms(fns: dict[str, Callable[[], Any]], rounds: int, number: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, without autograd. In every round each function in turn is
    timed by ``Timer.timeit(number)`` (its two warm-up calls, then ``number`` timed calls), so drift in a shared
    machine's speed hits them alike; the median is over the rounds' per-call means."""
    timers = {name: timer(fn, label=name) for name, fn in fns.items()}
    measured: dict[str, list[benchmark.Measurement]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, t in timers.items():
                measured[name].append(t.timeit(number))
    return {name: benchmark.Measurement.merge(ms)[0].median * 1000 for name, ms in measured.items()}


def publish(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], extra: dict[str, Any]) -> str:
    """Print the table and write ``benchmarks/results/<name>.json`` atomically; returns the JSON path."""
    print(text_table(columns, rows))
    path = os.path.join(RESULTS, f"{name}.json")
    write_json(path, {"benchmark": name, "environment": environment(), "columns": list(columns),
                      "rows": [list(r) for r in rows], **extra})
    print(f"\nwrote {path}")
    return path
