"""FIITED mixed-precision chunks: test AUC and total bytes per chunk budget x storage precision.

The protocol of ``fiited_quality.py`` (DLRM dim 64, ``chunk_size: 4``, 3 epochs, seeded 80/10/10 splits, mean of
``--seeds`` seeds) with one optimizer for every cell: Adagrad lr 0.02, because quantized chunks train only through
a fused update (Adam, which ``fiited_quality.py`` picks for Adult, has no fused form here). ``target`` is the chunk
budget: every precision keeps exactly the chunks FP32 FIITED keeps at that ``target_memory_ratio`` (payload at FP32
+ index); "total bytes" is what each model then holds for inference, measured from its tensors: codes + FP16 scales
+ the FP32 cache (rows and ids) + the 1.125-byte-a-row index, over the dense tables' bytes. ``-row`` precisions
keep one FP16 scale and offset a row (4 bytes a row) instead of an FP16 scale a chunk; ``+N%`` caches the rows
with the most accesses (``cache_rows``: N% of the rows), ``+N%B`` caches them in N% of the dense table's bytes
(``cache_bytes``: their stored chunks, FP32).

    python benchmarks/fiited_precision.py [--datasets movielens adult] [--ratios 0.25 0.1 0.05] [--seeds 3]
                                          [--precisions fp32 int8 int8+1%B ...] [--jobs 2] [--name N]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402
from fiited_quality import DATASETS, recipe  # noqa: E402

import torch  # noqa: E402

import compresskit  # noqa: E402
from compresskit.recipe import validate_recipe  # noqa: E402

PRECISIONS = {
    "fp32": {"storage": "fp32"},
    "int8+5%": {"storage": "int8", "cache_rows": 0.05},
    "int8+1%": {"storage": "int8", "cache_rows": 0.01},
    "int8": {"storage": "int8", "cache_rows": 0.0},
    "int8-nearest": {"storage": "int8", "cache_rows": 0.0, "rounding": "nearest"},
    "int4+5%": {"storage": "int4", "cache_rows": 0.05},
    "int4+1%": {"storage": "int4", "cache_rows": 0.01},
    "int4": {"storage": "int4", "cache_rows": 0.0},
    "int8-row": {"storage": "int8", "cache_rows": 0.0, "scales": "row"},
    "int4-row": {"storage": "int4", "cache_rows": 0.0, "scales": "row"},
    "int8+1%B": {"storage": "int8", "cache_bytes": 0.01},
    "int4+1%B": {"storage": "int4", "cache_bytes": 0.01},
}
DEFAULT = ["fp32", "int8", "int8+1%B", "int8-nearest", "int8-row", "int4", "int4+1%B", "int4-row"]   # docs columns


def run_cell(ds: str, precision: str | None, ratio: float, seed: int) -> dict:
    """One trained model: test AUC and the bytes it holds (``precision`` None: the dense model)."""
    method = "dense" if precision is None else "fiited"
    rec = recipe(DATASETS[ds], method, ratio, seed, "adagrad")
    rec["stages"][0]["chunk_size"] = 4        # every precision keeps the chunks FP32 keeps: one chunk size for all
    if precision is not None:
        rec["stages"][0]["precision"] = dict(PRECISIONS[precision])
    result = compresskit.run(validate_recipe(rec, require_model=True))
    stage = result.report["stages"][0]
    return {"auc": result.report["training"]["test"]["auc"], "memory_ratio": stage["memory_ratio"],
            "cache_bytes": stage.get("cache_bytes", 0), "payload_bytes": stage["payload_bytes"],
            "index_bytes": stage["index_bytes"], "stored_chunks": stage.get("stored_chunks", 0)}


def run_dataset(ds: str, ratios: list[float], seeds: int, precisions: list[str]) -> list[dict]:
    """Dense, then every (ratio, precision) of one dataset, each over ``seeds`` seeds."""
    if multiprocessing.current_process().name != "MainProcess":
        torch.set_num_threads(1)
    cells = []
    for ratio, precision in [(1.0, None)] + [(r, p) for r in ratios for p in precisions]:
        runs = [run_cell(ds, precision, ratio, seed) for seed in range(seeds)]
        cell = {"dataset": ds, "precision": precision or "dense", "ratio": ratio,
                "auc": statistics.mean(r["auc"] for r in runs), "auc_per_seed": [r["auc"] for r in runs],
                **{k: statistics.mean(r[k] for r in runs) for k in ("memory_ratio", "cache_bytes", "payload_bytes",
                                                                    "index_bytes", "stored_chunks")}}
        cells.append(cell)
        print(f"  {ds} {cell['precision']} {ratio}: AUC {cell['auc']:.4f}, bytes {cell['memory_ratio']:.4f}",
              flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.1, 0.05])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=DEFAULT, choices=list(PRECISIONS))
    parser.add_argument("--jobs", type=int, default=1, help="datasets run in this many processes (1 thread each)")
    parser.add_argument("--name", default="fiited_precision", help="results file name")
    args = parser.parse_args()
    todo = [ds for ds in args.datasets if os.path.exists(DATASETS[ds]["path"])]
    for ds in set(args.datasets) - set(todo):
        print(f"skipping {ds}: {DATASETS[ds]['path']} not found")
    jobs = [(ds, args.ratios, args.seeds, args.precisions) for ds in todo]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.starmap(run_dataset, jobs)
    else:
        results = [run_dataset(*job) for job in jobs]
    cells = [c for res in results for c in res]
    rows = []
    for c in cells:
        dense = next(d for d in cells if d["dataset"] == c["dataset"] and d["precision"] == "dense")
        fp32 = next((d for d in cells if d["dataset"] == c["dataset"] and d["precision"] == "fp32"
                     and d["ratio"] == c["ratio"]), None)
        rows.append([c["dataset"], c["ratio"], c["precision"], c["memory_ratio"],
                     c["cache_bytes"] / max(c["payload_bytes"] + c["index_bytes"], 1), c["auc"],
                     c["auc"] - dense["auc"], None if fp32 is None or c is dense else c["auc"] - fp32["auc"]])
    publish(args.name, ["dataset", "chunk budget", "precision", "total bytes / dense", "cache share",
                                 "mean test AUC", "dAUC vs dense", "dAUC vs fp32 FIITED"], rows,
            {"cells": cells, "seeds": args.seeds,
             "protocol": "DLRM dim 64, chunk_size 4, 3 epochs, batch 256, Adagrad lr 0.02 (fused), seeded split "
                         "80/10/10; every precision keeps the chunks FP32 FIITED keeps at the budget"})


if __name__ == "__main__":
    main()
