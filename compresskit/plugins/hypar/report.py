"""The HyPar planner report of a :class:`~.plan.HyparPlan`: plan.json, plan.md, plan.html (plot inlined) and
comm_per_layer.png.

Besides totals against the baselines and the per-layer table, the report has a stats table in the manner of
TorchRec's sharding planner (``EmbeddingStats``: one row per rank with its storage, perf and input/output sizes,
then a summary). HyPar's unit is not a rank but a level of the binary hierarchy: one row per level with the groups
split there, how many layers chose dp / mp at that level and the elements that cross the split (weight gradients,
forward feature maps, backward errors), then a total row equal to the plan's total.
"""
from __future__ import annotations

import base64
import html
import os
from typing import Any

from ...atomic import write_bytes, write_text
from ...plots import Figure, render_png
from ...report import html_table, human_bytes, markdown_table
from .perf import HMC_ACCELERATOR
from .plan import HyparPlan

Table = tuple[list[str], list[list[Any]]]


def _plot_png(plan: HyparPlan) -> bytes:
    series = {"HyPar": [r.elements for r in plan.layers]}
    for base in plan.baselines:
        series[base] = [r.baseline_elements[base] for r in plan.layers]
    return render_png(Figure("comm_per_layer", f"{plan.title}: {plan.accelerators} accelerators, batch {plan.batch}",
                             "bars", {label: [v * plan.element_bytes / 2**20 for v in values]
                                      for label, values in series.items()},
                             categories=[r.layer for r in plan.layers], ylabel="communication per step (MiB)",
                             yscale="symlog"))


def totals_table(plan: HyparPlan) -> Table:
    """HyPar and every baseline: total elements and bytes per step (the paper's model), baseline / HyPar, and the
    elements :func:`~.parallel.parallelize` exchanges running the plan (:func:`~.cost.executed_terms`)."""
    cols = ["plan", "total elements", "total bytes", "x HyPar", "as run by parallelize (elements)"]
    run = plan.executed_elements
    rows = [["HyPar", round(plan.total_elements["hypar"]), human_bytes(plan.total_bytes["hypar"]), 1.0,
             round(run["hypar"]) if "hypar" in run else "-"]]
    rows += [[name, round(plan.total_elements[name]), human_bytes(plan.total_bytes[name]), plan.ratio_vs_hypar[name],
              round(run[name]) if name in run else "-"] for name in plan.baselines]
    return cols, rows


def step_table(plan: HyparPlan) -> Table:
    """HyPar and every baseline: the modelled step time and energy, and their ratios against all data parallel."""
    cols = ["plan", "step time (ms)", "energy (J)", "speedup vs all-DP", "energy efficiency vs all-DP"]
    rows = [[{"hypar": "HyPar"}.get(name, name), 1000 * v["seconds"], v["joules"], v["speedup"],
             v["energy_efficiency"]] for name, v in plan.step.items()]
    return cols, rows


def level_table(plan: HyparPlan) -> Table:
    """The stats table: one row per hierarchy level, then the total (the plan's total elements and bytes)."""
    cols = ["level", "groups x accelerators", "dp layers", "mp layers", "weight gradients", "partial sums",
            "maps + errors", "elements", "bytes", "share"]
    rows: list[list[Any]] = [
        [s.level, f"{s.groups} x {s.group_size}", s.dp_layers, s.mp_layers, round(s.gradient_elements),
         round(s.partial_sum_elements), round(s.transition_elements), round(s.elements), human_bytes(s.bytes),
         f"{100 * s.share:.1f}%"]
        for s in plan.level_stats]
    st = plan.level_stats
    total = sum(s.elements for s in st)
    rows.append(["total", f"{plan.accelerators} accelerators", sum(s.dp_layers for s in st),
                 sum(s.mp_layers for s in st), round(sum(s.gradient_elements for s in st)),
                 round(sum(s.partial_sum_elements for s in st)), round(sum(s.transition_elements for s in st)),
                 round(total),
                 human_bytes(total * plan.element_bytes), "100.0%" if st else "-"])
    return cols, rows


def layer_table(plan: HyparPlan) -> Table:
    """One row per weighted layer: sizes, the choice at each level and the communication charged to it."""
    cols = ["layer", "kind", "input / sample", "kernel", "choice per level (top first)", "elements", "bytes",
            "share"]
    total = plan.total_elements["hypar"]
    rows = [[r.layer, r.kind, r.input_elems, r.weight_elems, " ".join(r.choices), round(r.elements),
             human_bytes(r.bytes), f"{100 * r.elements / total:.1f}%" if total else "-"] for r in plan.layers]
    return cols, rows


def headline(plan: HyparPlan) -> str:
    """One line: hierarchy, batch, dtype, search and planner time."""
    return (f"{plan.accelerators} accelerators ({plan.levels} levels), batch {plan.batch}, {plan.dtype}, "
            f"search: {plan.search} over {', '.join(plan.partitions)}, "
            f"planned in {plan.planner_seconds * 1000:.1f} ms")


def summary(plan: HyparPlan) -> str:
    """The one-line summary ``compresskit plan`` prints."""
    ratios = ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in plan.ratio_vs_hypar.items())
    return (f"{plan.title}: {plan.accelerators} accelerators, batch {plan.batch}: HyPar moves "
            f"{plan.total_bytes['hypar'] / 2**20:.1f} MiB per step; {ratios}")


_SECTIONS = [("Totals (communication per training step, all accelerators)", "Totals", totals_table),
             ("Modelled step time and energy", "Modelled step time and energy", step_table),
             ("Per hierarchy level", "Per hierarchy level", level_table),
             ("Per layer", "Per layer", layer_table)]
_LEVEL_NOTE = ("Level k splits each of its 2^k groups of accelerators in two. Elements cross the split in both "
               "directions, summed over the groups: weight gradients of the layers data parallel there, partial "
               "sums completed inside the layers model parallel there (mp: outputs, forward; mp_out: input "
               "errors, backward), and the feature maps (forward) and errors (backward) re-laid out between "
               "layers.")


_STEP_NOTE = (f"One training step on {HMC_ACCELERATOR.name} accelerators (compute, memory traffic and links; "
              "parameters and their sources in docs/hypar.md). The paper reports 3.39x speedup and 1.51x energy "
              "efficiency over data parallelism on 16 accelerators (geometric means over its ten networks).")


def render_markdown(plan: HyparPlan) -> str:
    """plan.md."""
    parts = [f"# HyPar plan: {plan.title}", "", headline(plan), ""]
    for title, _, table in _SECTIONS:
        parts += [f"## {title}", ""]
        if table is level_table:
            parts += [_LEVEL_NOTE, ""]
        if table is step_table:
            parts += [_STEP_NOTE, ""]
        parts += [markdown_table(*table(plan)), ""]
    parts += ["![communication per layer](comm_per_layer.png)", ""]
    return "\n".join(parts)


def render_html(plan: HyparPlan, png: bytes) -> str:
    """plan.html, with the plot inlined."""
    title = html.escape(plan.title)
    body = [f"<h1>HyPar plan: {title}</h1><p>{html.escape(headline(plan))}</p>"]
    for _, short, table in _SECTIONS:
        if table is layer_table:
            img = base64.b64encode(png).decode()
            body.append(f"<h2>Communication per layer</h2>"
                        f"<img alt='communication per layer' src='data:image/png;base64,{img}'>")
        note = {level_table: f"<p>{html.escape(_LEVEL_NOTE)}</p>",
                step_table: f"<p>{html.escape(_STEP_NOTE)}</p>"}.get(table, "")
        body.append(f"<h2>{short}</h2>{note}{html_table(*table(plan))}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>HyPar plan: {title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            + "".join(body) + "</body></html>")


def write_plan_report(plan: HyparPlan, out_dir: str) -> list[str]:
    """Write plan.json, comm_per_layer.png, plan.md and plan.html into ``out_dir`` (each atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    png = _plot_png(plan)
    paths = [plan.save(os.path.join(out_dir, "plan.json")),
             write_bytes(os.path.join(out_dir, "comm_per_layer.png"), png),
             write_text(os.path.join(out_dir, "plan.md"), render_markdown(plan)),
             write_text(os.path.join(out_dir, "plan.html"), render_html(plan, png))]
    return [str(p) for p in paths]
