"""Run reports: JSON for machines, Markdown (and HTML) for people. Shared by every plugin and benchmark."""
from __future__ import annotations

import html
import math
from typing import Any, Sequence


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant places, big ints with thousands separators."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table for terminals (benchmarks print these)."""
    cells = [list(columns)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _flat(prefix: str, obj: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "tables":
                continue
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        return  # long structured lists live in the JSON only
    else:
        out.append((prefix, obj))


def render_sections(report: dict[str, Any]) -> list[tuple[int, str, list[str], list[list[Any]]]]:
    """(heading level, heading, columns, rows) of every table of a run report: key numbers, then each stage's
    numbers and its own tables (level 3, under their stage)."""
    sections: list[tuple[int, str, list[str], list[list[Any]]]] = []
    for section in ("run", "training", "memory"):
        if section in report and report[section]:
            rows: list[tuple[str, Any]] = []
            _flat("", report[section], rows)
            sections.append((2, section.capitalize(), ["metric", "value"], [list(r) for r in rows]))
    for stage in report.get("stages", []):
        rows = []
        _flat("", {k: v for k, v in stage.items() if k != "plugin"}, rows)
        sections.append((2, f"Stage: {stage.get('plugin', '?')}", ["metric", "value"], [list(r) for r in rows]))
        for table in stage.get("tables", []):
            sections.append((3, table["title"], list(table["columns"]), table["rows"]))
    return sections


def render_markdown(report: dict[str, Any], title: str = "compresskit run report",
                    plots: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown for a run report: key numbers as tables, then each stage's own tables, then ``plots`` ((title,
    relative PNG path) pairs) as images."""
    parts = [f"# {title}", ""]
    for level, heading, columns, rows in render_sections(report):
        parts += [f"{'#' * level} {heading}", ""]
        if rows:
            parts += [markdown_table(columns, rows), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{name}]({path})\n" for name, path in plots]
    return "\n".join(parts)
