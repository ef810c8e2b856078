"""FIITED quality: test AUC / log loss against embedding bytes kept, FIITED vs baselines at equal bytes.

DLRM (dim 64) on MovieLens-100K and UCI Adult from ../shared/data, seeded 80/10/10 split, 3 epochs of Adagrad
(or Adam with ``--optimizer adam``), the same recipe for every method; only the ``fiited`` stage's method and target
change. Each cell is the mean over ``--seeds`` seeds (the seed sets the split, the initialisation and the shuffling).

    python benchmarks/fiited_quality.py [--datasets movielens adult] [--ratios 1 0.5 0.25 0.1 0.05 0.01] [--seeds 3]
                                        [--optimizer adagrad|adam]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish, shared_data  # noqa: E402

import compresskit  # noqa: E402
from compresskit.recipe import validate_recipe  # noqa: E402

DATASETS = {
    "movielens": {"name": "movielens-100k", "path": shared_data("ml-100k")},
    "adult": {"name": "adult", "path": shared_data("adult", "adult.csv")},
}
METHODS = ["fiited", "adaembed", "mixed_dim", "uniform"]
OPTIMIZERS = {"adagrad": {"name": "adagrad", "lr": 0.02}, "adam": {"name": "adam", "lr": 0.002}}


def recipe(data: dict, method: str, ratio: float, seed: int, optimizer: str = "adagrad") -> dict:
    """The one recipe every cell of the table runs."""
    stage = {"plugin": "fiited", "method": method, "target_memory_ratio": ratio,
             "chunk_size": 1 if method == "uniform" else 4}
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 64, "bottom_mlp": [64], "top_mlp": [64]}},
        "data": data,
        "train": {"epochs": 3, "batch_size": 256, "optimizer": dict(OPTIMIZERS[optimizer]), "seed": seed,
                  "progress": False},
        "stages": [stage],
    }


def run_cell(data: dict, method: str, ratio: float, seed: int, optimizer: str) -> dict:
    """Train one (method, ratio) and return its test metrics and measured bytes."""
    rec, stages = validate_recipe(recipe(data, method, ratio, seed, optimizer), require_model=True)
    try:
        result = compresskit.run(rec, stages)
    except compresskit.ConfigError as e:  # e.g. uniform below one dimension per row
        return {"error": str(e)}
    stage = result.report["stages"][0]
    test = result.report["training"]["test"]
    return {"auc": test["auc"], "logloss": test["logloss"], "payload_ratio": stage["payload_ratio"],
            "payload_bytes": stage["payload_bytes"], "metadata_bytes": stage["index_bytes"] + stage["stats_bytes"],
            "dense_payload_bytes": stage["dense_payload_bytes"]}


def run_seeds(data: dict, method: str, ratio: float, seeds: int, optimizer: str) -> dict:
    """``run_cell`` for seeds 0..seeds-1; means of AUC / log loss, and the per-seed values."""
    runs = [run_cell(data, method, ratio, seed, optimizer) for seed in range(seeds)]
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    return {"auc": statistics.mean(r["auc"] for r in runs), "logloss": statistics.mean(r["logloss"] for r in runs),
            "payload_ratio": statistics.mean(r["payload_ratio"] for r in runs),
            "payload_bytes": runs[0]["payload_bytes"], "metadata_bytes": runs[0]["metadata_bytes"],
            "dense_payload_bytes": runs[0]["dense_payload_bytes"], "auc_per_seed": [r["auc"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adagrad",
                        help="adagrad (lr 0.02, the main protocol) or adam (lr 0.002); adam writes "
                             "fiited_quality_adam.json")
    args = parser.parse_args()
    rows, cells = [], []
    for ds in args.datasets:
        data = DATASETS[ds]
        if not os.path.exists(data["path"]):
            print(f"skipping {ds}: {data['path']} not found")
            continue
        dense = run_seeds(data, "dense", 1.0, args.seeds, args.optimizer)
        cells.append({"dataset": ds, "method": "dense", "ratio": 1.0, **dense})
        rows.append([ds, "dense", 1.0, dense["payload_ratio"], dense["auc"], dense["logloss"], 0.0])
        for ratio in args.ratios:
            if ratio >= 1.0:
                continue
            for method in METHODS:
                cell = run_seeds(data, method, ratio, args.seeds, args.optimizer)
                cells.append({"dataset": ds, "method": method, "ratio": ratio, **cell})
                if "error" in cell:
                    rows.append([ds, method, ratio, None, None, None, None])
                else:
                    rows.append([ds, method, ratio, cell["payload_ratio"], cell["auc"], cell["logloss"],
                                 cell["auc"] - dense["auc"]])
                print(f"  {ds} {method} {ratio}: {cell}", flush=True)
    opt = OPTIMIZERS[args.optimizer]
    name = "fiited_quality" if args.optimizer == "adagrad" else f"fiited_quality_{args.optimizer}"
    publish(name, ["dataset", "method", "target", "payload kept", "mean test AUC", "mean logloss",
                   "dAUC vs dense"], rows,
            {"cells": cells, "seeds": args.seeds,
             "protocol": f"DLRM dim 64, 3 epochs {opt['name']} lr {opt['lr']}, batch 256, seeded split 80/10/10"})


if __name__ == "__main__":
    main()
