"""Shared benchmark plumbing: locating ../shared/data, writing results, printing tables."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Sequence

import torch

from compresskit.atomic import write_json
from compresskit.report import text_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def shared_data(*parts: str) -> str:
    """Path under the shared data folder (``$COMPRESSKIT_DATA`` or ../shared/data beside the repo)."""
    base = os.environ.get("COMPRESSKIT_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
    return os.path.join(base, *parts)


def environment() -> dict[str, Any]:
    """Where the numbers were taken."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def publish(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], extra: dict[str, Any]) -> str:
    """Print the table and write ``benchmarks/results/<name>.json`` atomically; returns the JSON path."""
    print(text_table(columns, rows))
    path = os.path.join(RESULTS, f"{name}.json")
    write_json(path, {"benchmark": name, "environment": environment(), "columns": list(columns),
                      "rows": [list(r) for r in rows], **extra})
    print(f"\nwrote {path}")
    return path
