"""The renderers' registry and the helpers they share: reading a results file, its provenance line, table cells."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str, block: bool = True) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register ``fn() -> markdown`` as the renderer of ``<!-- render: name -->``; a block renderer's output sits
    on lines of its own, an inline one's inside a sentence."""
    def add(fn: Callable[[], str]) -> Callable[[], str]:
        RENDERERS[name] = (lambda: "\n" + fn().strip("\n") + "\n") if block else fn
        return fn
    return add


def load(name: str) -> dict[str, Any]:
    """``benchmarks/results/<name>.json``."""
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def provenance(*names: str) -> str:
    """Where the numbers come from: file, date, machine, threads, torch and commit of each results file."""
    parts = []
    for name in names:
        data = load(name)
        env = data.get("environment", {})
        cpu = env.get("cpu_model") or env.get("machine", "?")
        commit = env.get("commit") or "not recorded"
        # a benchmark that runs several thread counts (each in its own process) lists them; else the process's
        threads = data.get("threads")
        threads = " and ".join(map(str, threads)) if isinstance(threads, list) else env.get("threads", "?")
        parts.append(f"`benchmarks/results/{name}.json`: {env.get('date', '?')}, {cpu}, {env.get('cpus', '?')} "
                     f"CPUs, {threads} threads, torch {env.get('torch', '?')}, commit {commit}")
    return "_Measured: " + "; ".join(parts) + "._"


def measured_on(*names: str) -> str:
    """The dates the results files were measured on, for a sentence that quotes them ("measured 2026-12-02")."""
    dates = sorted({load(name).get("environment", {}).get("date", "?") for name in names})
    return "measured " + " and ".join(dates)


def number(value: Any, digits: int | None = None) -> str:
    """A table cell: ``digits`` decimals if given, else three significant digits (two decimals below 1, whole
    numbers whole); yes/no for booleans, - for nothing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if digits is not None:
            return f"{value:.{digits}f}"
        magnitude = abs(value)
        if magnitude >= 100 or (value == int(value) and magnitude >= 1):
            return f"{value:.0f}"
        return f"{value:.3g}" if magnitude >= 1 else f"{value:.2f}" if magnitude >= 0.01 else f"{value:.2g}"
    return str(value)


def rows_table(name: str, digits: dict[str, int] | None = None) -> str:
    """The results file's own table (its ``columns`` and ``rows``) as markdown; ``digits``: decimals of some
    columns."""
    data = load(name)
    columns, digits = data["columns"], digits or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in data["rows"]:
        lines.append("| " + " | ".join(number(v, digits.get(c)) for c, v in zip(columns, row)) + " |")
    return "\n".join(lines) + "\n\n" + provenance(name)


def span(values: list[float], digits: int = 2, unit: str = "x") -> str:
    """``lo-hi`` of ``values`` (one value when they round alike)."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A loaded results file's table rows as dicts by column."""
    return [dict(zip(data["columns"], r)) for r in data["rows"]]
