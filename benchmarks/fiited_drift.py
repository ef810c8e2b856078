"""FIITED under data drift: a seeded click stream (``drift-ctr``) whose id popularity and per-id effects change at
mid-training, trained in time order. Post-drift test AUC of the dense model, FIITED with and without regrowth and
AdaEmbed at 10% and 5% of the dense embedding bytes, and how many chunks the newly and the formerly popular rows
keep over training (a plot).

DLRM (dim 16, chunk 4), 4 fields of 5,000 ids, 100,000 samples in time order (drift at 50%), Adagrad lr 0.05,
batch 128, one pass; pruning every 20 steps from 10% to 50% of training. Means over ``--seeds`` seeds.

    python benchmarks/fiited_drift.py [--seeds 3] [--samples 100000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, publish  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import compresskit  # noqa: E402
from compresskit.atomic import write_bytes  # noqa: E402
from compresskit.data.drift_ctr import DriftCTR, load_drift_ctr  # noqa: E402
from compresskit.metrics import roc_auc  # noqa: E402
from compresskit.models.dlrm import DLRM  # noqa: E402
from compresskit.plots import Figure, render_png  # noqa: E402
from compresskit.plugins.fiited import FiitedConfig  # noqa: E402
from compresskit.plugins.fiited.embedding import fiited_modules  # noqa: E402

NUM_IDS, FIELDS, TOP = 5000, 4, 100
METHODS = {"dense": None, "fiited (no regrowth)": {"method": "fiited", "regrow": False},
           "fiited (regrowth)": {"method": "fiited", "regrow": True}, "adaembed": {"method": "adaembed"}}


def groups(seed: int) -> dict[str, list[torch.Tensor]]:
    """Per field: ids popular only after the drift (newly popular) and only before it (formerly popular)."""
    stream = DriftCTR(NUM_IDS, FIELDS, seed=seed)
    out: dict[str, list[torch.Tensor]] = {"newly popular": [], "formerly popular": []}
    for f in range(FIELDS):
        newly, formerly = stream.changed_ids(f, TOP)
        out["newly popular"].append(newly)
        out["formerly popular"].append(formerly)
    return out


def mean_chunks(model: torch.nn.Module, ids: list[torch.Tensor]) -> float:
    counts = [m.row_chunk_counts()[i].float() for (_, m), i in zip(fiited_modules(model), ids)]
    return float(torch.cat(counts).mean())


def run(method: str, ratio: float, seed: int, samples: int) -> dict:
    """One time-ordered pass; returns post-drift test AUC and the kept-chunk trajectories of both row groups."""
    data = load_drift_ctr(seed=seed, num_samples=samples, num_ids=NUM_IDS, fields=FIELDS)
    torch.manual_seed(seed)
    model = DLRM(data.info["num_dense"], data.info["cardinalities"], embedding_dim=16, bottom_mlp=[16], top_mlp=[64])
    steps = len(data.train) // 128
    options = METHODS[method]
    compression = None
    if options is not None:
        compression = compresskit.prepare(model, FiitedConfig(target_memory_ratio=ratio, chunk_size=4, interval=20,
                                                              **options), total_steps=steps)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    if compression is not None:
        compression.attach_optimizer(optimizer)
    rows = groups(seed)
    trace: dict[str, list] = {"step": [], **{g: [] for g in rows}}
    dense, sparse, label = data.train.tensors
    model.train()
    for step in range(steps):
        at = slice(step * 128, (step + 1) * 128)
        loss = F.binary_cross_entropy_with_logits(model(dense[at], sparse[at]), label[at])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if compression is not None:
            compression.after_backward()
        optimizer.step()
        if compression is not None:
            compression.step()
            if step % 20 == 0 or step == steps - 1:
                trace["step"].append(step)
                for g, ids in rows.items():
                    trace[g].append(mean_chunks(model, ids))
    if compression is not None:
        compression.finalize()
    model.eval()
    with torch.no_grad():
        *inputs, test_label = data.test.tensors
        auc = roc_auc(test_label, torch.sigmoid(model(*inputs)))
    report = compression.report()["stages"][0] if compression is not None else {"memory_ratio": 1.0}
    return {"auc": float(auc), "memory_ratio": report["memory_ratio"], "trace": trace, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, cells, traces = [], [], {}
    dense = None
    for ratio in (0.1, 0.05):
        for method in METHODS:
            if method == "dense" and dense is not None:
                continue
            runs = [run(method, ratio, seed, args.samples) for seed in range(args.seeds)]
            auc = statistics.mean(r["auc"] for r in runs)
            if method == "dense":
                dense = auc
            cell = {"method": method, "ratio": 1.0 if method == "dense" else ratio, "auc": auc,
                    "auc_per_seed": [r["auc"] for r in runs],
                    "memory_ratio": statistics.mean(r["memory_ratio"] for r in runs)}
            if method != "dense":
                final = {g: statistics.mean(r["trace"][g][-1] for r in runs) for g in ("newly popular",
                                                                                         "formerly popular")}
                at_drift = {g: statistics.mean(r["trace"][g][len(r["trace"][g]) // 2] for r in runs)
                            for g in final}
                cell.update({"newly_popular_chunks": {"at_drift": at_drift["newly popular"],
                                                      "end": final["newly popular"]},
                             "formerly_popular_chunks": {"at_drift": at_drift["formerly popular"],
                                                         "end": final["formerly popular"]},
                             "trace_seed0": runs[0]["trace"]})
                traces[f"{method} {ratio:g}"] = runs[0]["trace"]
            cells.append(cell)
            rows.append([method, cell["ratio"], cell["memory_ratio"], auc, auc - dense,
                         cell.get("newly_popular_chunks", {}).get("at_drift"),
                         cell.get("newly_popular_chunks", {}).get("end"),
                         cell.get("formerly_popular_chunks", {}).get("at_drift"),
                         cell.get("formerly_popular_chunks", {}).get("end")])
            print(f"  {method} {ratio}: AUC {auc:.4f}", flush=True)
    publish("fiited_drift", ["method", "target", "memory ratio", "post-drift AUC", "vs dense",
                             "newly popular chunks at drift", "... at end", "formerly popular at drift",
                             "... at end"], rows,
            {"samples": args.samples, "ids_per_field": NUM_IDS, "fields": FIELDS, "seeds": args.seeds,
             "threads": 1, "cells": cells})
    series = {}
    for name, trace in traces.items():
        if name.endswith(" 0.1"):
            for g in ("newly popular", "formerly popular"):
                series[f"{name[:-4]}: {g}"] = (trace["step"], trace[g])
    png = render_png(Figure("fiited_drift_chunks", "Mean chunks kept (of 4) by rows popular after / before the "
                            "drift (10% target, seed 0)", "line", series, xlabel="step", ylabel="chunks kept",
                            steps=True))
    target = os.path.join(RESULTS, "fiited_drift_chunks.png")
    write_bytes(target, png)
    print(f"wrote {target}")

if __name__ == "__main__":
    main()
