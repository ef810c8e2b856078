"""Plots for reports: a plugin describes a :class:`Figure` (data only), the core renders it to PNG with matplotlib
(Agg) and inlines it in ``report.html``. Line plots (training curves) and grouped bars (histograms, per-layer
numbers)."""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from .report import html_table, render_sections


_REFERENCE_STYLES = [("--", "grey"), (":", "firebrick"), ("-.", "darkgreen")]


@dataclass
class Figure:
    """One plot. ``line``: ``series`` maps a label to ``(xs, ys)``. ``bars``: ``categories`` on the x axis and
    ``series`` mapping a label to one value per category (grouped bars). ``hlines``: labelled horizontal reference
    lines (e.g. the dense bytes)."""

    name: str                       # file name stem: plots/<name>.png
    title: str
    kind: Literal["line", "bars"]
    series: dict[str, Any]
    xlabel: str = ""
    ylabel: str = ""
    categories: Sequence[Any] = ()
    yscale: Literal["linear", "log", "symlog"] = "linear"
    hlines: dict[str, float] = field(default_factory=dict)
    steps: bool = False             # line: hold each value until the next point (a quantity that jumps)


def render_png(fig_spec: Figure) -> bytes:
    """The PNG bytes of a figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 7.0 if fig_spec.kind == "line" else max(6.0, 0.45 * len(fig_spec.categories) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.0), dpi=110)
    try:
        if fig_spec.kind == "line":
            for label, (xs, ys) in fig_spec.series.items():
                points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.4,
                            drawstyle="steps-post" if fig_spec.steps else "default")
        else:
            n = max(len(fig_spec.series), 1)
            bar = 0.8 / n
            for j, (label, values) in enumerate(fig_spec.series.items()):
                xs = [i + (j - (n - 1) / 2) * bar for i in range(len(fig_spec.categories))]
                ax.bar(xs, list(values), width=bar, label=label)
            ax.set_xticks(range(len(fig_spec.categories)))
            rotate = len(fig_spec.categories) > 8 or any(len(str(c)) > 6 for c in fig_spec.categories)
            ax.set_xticklabels([str(c) for c in fig_spec.categories], rotation=60 if rotate else 0,
                               ha="right" if rotate else "center", fontsize=8)
        for (label, y), (style, color) in zip(fig_spec.hlines.items(), _REFERENCE_STYLES * len(fig_spec.hlines)):
            ax.axhline(y, linestyle=style, color=color, linewidth=1.0, label=label)
        if fig_spec.yscale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        elif fig_spec.yscale == "log":
            ax.set_yscale("log")
        ax.set_xlabel(fig_spec.xlabel)
        ax.set_ylabel(fig_spec.ylabel)
        ax.set_title(fig_spec.title, fontsize=10)
        if len(fig_spec.series) + len(fig_spec.hlines) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def training_figures(rows: list[dict[str, float]]) -> list[Figure]:
    """The core's curves of a training log: the loss (per logged step and smoothed)."""
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    return [Figure("loss", "Training loss", "line",
                   {"loss (logged step)": (steps, [r.get("loss") for r in rows]),
                    "smoothed loss": (steps, [r.get("smoothed_loss") for r in rows])},
                   xlabel="optimizer step", ylabel="loss")]


def render_html(report: dict[str, Any], figures: list[tuple[Figure, bytes]],
                title: str = "compresskit run report") -> str:
    """A self-contained report.html: the report's tables and every figure inlined as a PNG."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for level, heading, columns, rows in render_sections(report):
        body.append(f"<h{level}>{html.escape(heading)}</h{level}>" + (html_table(columns, rows) if rows else ""))
    if figures:
        body.append("<h2>Plots</h2>")
    for fig, png in figures:
        img = base64.b64encode(png).decode()
        body.append(f"<h3>{html.escape(fig.title)}</h3><img alt='{html.escape(fig.title)}' "
                    f"src='data:image/png;base64,{img}'>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "img{max-width:100%}</style></head><body>" + "".join(body) + "</body></html>")
