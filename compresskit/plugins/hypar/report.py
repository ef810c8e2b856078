"""The HyPar planner report: plan.json, plan.md, plan.html (with the plot inlined) and comm_per_layer.png."""
from __future__ import annotations

import base64
import io
import os
from typing import Any, Sequence

from ...atomic import write_bytes, write_json, write_text
from ...report import html_table, human_bytes, markdown_table
from .cost import DTYPE_BYTES
from .graph import LayerSpec
from .search import Plan, layer_costs


def build_plan_report(title: str, layers: Sequence[LayerSpec], plan: Plan, baselines: dict[str, Plan], batch: int,
                      accelerators: int, dtype: str, search: str, seconds: float) -> dict[str, Any]:
    """The machine-readable plan: per-layer choices and costs, totals and ratios against each baseline."""
    elem_bytes = DTYPE_BYTES[dtype]
    per_layer = layer_costs(layers, plan, batch)
    base_layers = {name: layer_costs(layers, p, batch) for name, p in baselines.items()}
    rows = []
    for i, layer in enumerate(layers):
        rows.append({"layer": layer.name, "kind": layer.kind, "choices": plan.choices(i),
                     "elements": per_layer[i], "bytes": per_layer[i] * elem_bytes,
                     "baseline_elements": {name: costs[i] for name, costs in base_layers.items()}})
    totals = {"hypar": plan.elements, **{name: p.elements for name, p in baselines.items()}}
    return {
        "title": title, "accelerators": accelerators, "levels": plan.levels, "batch": batch, "dtype": dtype,
        "search": search, "planner_seconds": seconds, "layers": rows,
        "total_elements": totals,
        "total_bytes": {k: v * elem_bytes for k, v in totals.items()},
        "ratio_vs_hypar": {name: (p.elements / plan.elements if plan.elements else float("inf"))
                           for name, p in baselines.items()},
    }


def _plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in report["layers"]]
    elem_bytes = DTYPE_BYTES[report["dtype"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.0), dpi=110)
    series = {"HyPar": [r["elements"] for r in report["layers"]]}
    for base in report["layers"][0]["baseline_elements"]:
        series[base] = [r["baseline_elements"][base] for r in report["layers"]]
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [v * elem_bytes / 2**20 for v in values], width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("communication per step (MiB)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"{report['title']}: {report['accelerators']} accelerators, batch {report['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _tables(report: dict[str, Any]) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    elem_bytes = DTYPE_BYTES[report["dtype"]]
    layer_cols = ["layer", "kind", "choice per level (top first)", "elements", "bytes"]
    layer_rows = [[r["layer"], r["kind"], " ".join(r["choices"]), round(r["elements"]),
                   human_bytes(r["elements"] * elem_bytes)] for r in report["layers"]]
    total_cols = ["plan", "total elements", "total bytes", "x HyPar"]
    hypar = report["total_elements"]["hypar"]
    total_rows = [["HyPar", round(hypar), human_bytes(hypar * elem_bytes), 1.0]]
    for name, value in report["total_elements"].items():
        if name != "hypar":
            total_rows.append([name, round(value), human_bytes(value * elem_bytes), report["ratio_vs_hypar"][name]])
    return layer_cols, layer_rows, total_cols, total_rows


def write_plan_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write plan.json, comm_per_layer.png, plan.md and plan.html into ``out_dir`` (each atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    png = _plot_png(report)
    layer_cols, layer_rows, total_cols, total_rows = _tables(report)
    head = (f"{report['accelerators']} accelerators ({report['levels']} levels), batch {report['batch']}, "
            f"{report['dtype']}, search: {report['search']}, planned in {report['planner_seconds'] * 1000:.1f} ms")
    md = "\n".join([
        f"# HyPar plan: {report['title']}", "", head, "",
        "## Totals (communication per training step, all accelerators)", "", markdown_table(total_cols, total_rows),
        "", "## Per layer", "", markdown_table(layer_cols, layer_rows), "",
        "![communication per layer](comm_per_layer.png)", "",
    ])
    img = base64.b64encode(png).decode()
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>HyPar plan: {report['title']}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            f"<h1>HyPar plan: {report['title']}</h1><p>{head}</p><h2>Totals</h2>{html_table(total_cols, total_rows)}"
            f"<h2>Communication per layer</h2><img alt='communication per layer' src='data:image/png;base64,{img}'>"
            f"<h2>Per layer</h2>{html_table(layer_cols, layer_rows)}</body></html>")
    paths = [write_json(os.path.join(out_dir, "plan.json"), report),
             write_bytes(os.path.join(out_dir, "comm_per_layer.png"), png),
             write_text(os.path.join(out_dir, "plan.md"), md),
             write_text(os.path.join(out_dir, "plan.html"), html)]
    return [str(p) for p in paths]
