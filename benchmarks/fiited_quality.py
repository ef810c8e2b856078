"""FIITED quality: test AUC / log loss against embedding bytes kept, FIITED vs baselines at equal total bytes.

Every method is charged what it really stores for inference, payload plus index, measured from its tensors:
FIITED (without regrowth, the default, and with) and AdaEmbed pruning their chunk store (pool + 1.125-byte-a-row index), uniform a narrower
``nn.EmbeddingBag``, mixed-dim its frequency-bucket tables, projections and id remap, and the hashing family in its
natural forms (``compresskit/plugins/fiited/hashing.py``): the hashing trick its shared rows, QR its quotient and
remainder tables, ROBE its one array, TT-Rec its three cores (each with a few bytes of hash parameters). Each table
of those gets its share of the bytes (``share_budget``: a row cap, ``min(dense bytes, cap)`` with the largest cap
that fits, at least its smallest form). Training-only state (utilities, optimizer state) is reported beside it, not charged. Each cell also gives
the training speed (samples trained over the run's ``train_seconds``).

DLRM (dim 64) on MovieLens-100K and UCI Adult from ../shared/data, seeded 80/10/10 split, 3 epochs, the same recipe
for every method; only the ``fiited`` stage's method and target change (its other settings are the defaults:
``chunk_size: auto`` gives 4-value chunks from 7% of the bytes up, 2 at 5%, 1 at 2% and 1%). Each cell is the mean over ``--seeds`` seeds
(the seed sets the split, the initialisation and the shuffling).

The optimizer is a hyperparameter of the dense model. With ``--optimizer auto`` (the default) each dataset's dense
model is trained with every candidate (Adagrad lr 0.02, Adam lr 0.002) and the one with the better mean
*validation* AUC is used for every method on that dataset; ``--optimizer adagrad|adam`` fixes it for all datasets
(written to ``fiited_quality_<optimizer>.json``).

    python benchmarks/fiited_quality.py [--datasets movielens adult] [--ratios 1 0.5 0.25 0.1 0.05 0.02 0.01] [--seeds 3]
                                        [--optimizer auto|adagrad|adam] [--jobs 2]
    python benchmarks/fiited_quality.py --data frappe=libfm:/data/frappe --name fiited_quality_frappe   # your data
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish, shared_data  # noqa: E402

import torch  # noqa: E402

import compresskit  # noqa: E402
from compresskit.recipe import validate_recipe  # noqa: E402

DATASETS = {
    "movielens": {"name": "movielens-100k", "path": shared_data("ml-100k")},
    "adult": {"name": "adult", "path": shared_data("adult", "adult.csv")},
}
METHODS = ["fiited", "fiited-regrow", "fiited-gradient-weight", "adaembed", "mixed_dim", "uniform", "hashing", "qr",
           "robe", "tt_rec"]
VARIANTS = {"fiited-regrow": ("fiited", {"regrow": True}),   # a method with options: (method, stage options)
            "fiited-gradient-weight": ("fiited", {"utility": "gradient_weight"})}
OPTIMIZERS = {"adagrad": {"name": "adagrad", "lr": 0.02}, "adam": {"name": "adam", "lr": 0.002}}


def recipe(data: dict, method: str, ratio: float, seed: int, optimizer: str = "adagrad") -> dict:
    """The one recipe every cell of the table runs."""
    method, options = VARIANTS.get(method, (method, {}))
    stage = {"plugin": "fiited", "method": method, "target_memory_ratio": ratio, **options}   # default chunk_size
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 64, "bottom_mlp": [64], "top_mlp": [64]}},
        "data": data,
        "train": {"epochs": 3, "batch_size": 256, "optimizer": dict(OPTIMIZERS[optimizer]), "seed": seed,
                  "progress": False},
        "stages": [stage],
    }


def run_cell(data: dict, method: str, ratio: float, seed: int, optimizer: str) -> dict:
    """Train one (method, ratio) and return its test metrics and measured bytes."""
    rec = validate_recipe(recipe(data, method, ratio, seed, optimizer), require_model=True)
    try:
        result = compresskit.run(rec)
    except compresskit.ConfigError as e:  # e.g. uniform below one dimension per row
        return {"error": str(e)}
    stage = result.report["stages"][0]
    training = result.report["training"]
    test = training["test"]
    samples = training["steps"] * rec.train.batch_size
    return {"auc": test["auc"], "logloss": test["logloss"], "val_auc": training["val"]["auc"],
            "samples_per_s": samples / max(training["train_seconds"], 1e-9),
            "memory_ratio": stage["memory_ratio"], "payload_bytes": stage["payload_bytes"],
            "index_bytes": stage["index_bytes"], "training_state_bytes": stage["training_state_bytes"],
            "dense_bytes": stage["dense_bytes"]}


def run_seeds(data: dict, method: str, ratio: float, seeds: int, optimizer: str) -> dict:
    """``run_cell`` for seeds 0..seeds-1; means of AUC / log loss, and the per-seed values."""
    runs = [run_cell(data, method, ratio, seed, optimizer) for seed in range(seeds)]
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    return {"auc": statistics.mean(r["auc"] for r in runs), "logloss": statistics.mean(r["logloss"] for r in runs),
            "val_auc": statistics.mean(r["val_auc"] for r in runs),
            "samples_per_s": statistics.mean(r["samples_per_s"] for r in runs),
            "memory_ratio": statistics.mean(r["memory_ratio"] for r in runs),
            "index_ratio": statistics.mean(r["index_bytes"] / max(r["payload_bytes"], 1) for r in runs),
            "payload_bytes": runs[0]["payload_bytes"], "index_bytes": runs[0]["index_bytes"],
            "training_state_bytes": runs[0]["training_state_bytes"], "dense_bytes": runs[0]["dense_bytes"],
            "auc_per_seed": [r["auc"] for r in runs]}


def dense_by_optimizer(data: dict, seeds: int, optimizer: str) -> tuple[str, dict, dict]:
    """(optimizer, its dense cell, every candidate's dense cell): ``auto`` picks the best mean validation AUC."""
    candidates = list(OPTIMIZERS) if optimizer == "auto" else [optimizer]
    dense = {name: run_seeds(data, "dense", 1.0, seeds, name) for name in candidates}
    chosen = max(candidates, key=lambda name: dense[name]["val_auc"])
    return chosen, dense[chosen], dense


def run_dataset(ds: str, ratios: list[float], seeds: int, optimizer: str, methods: list[str] = METHODS,
                data: dict | None = None) -> tuple[list, list, dict]:
    """Every (method, ratio) cell of one dataset (``data``: its recipe ``data`` section, default
    ``DATASETS[ds]``): (table rows, JSON cells, the optimizer selection)."""
    if torch.get_num_threads() > 1 and multiprocessing.current_process().name != "MainProcess":
        torch.set_num_threads(1)
    data = data or DATASETS[ds]
    rows, cells = [], []
    opt, dense, candidates = dense_by_optimizer(data, seeds, optimizer)
    selection = {"optimizer": opt, **{name: {"dense_val_auc": c["val_auc"], "dense_test_auc": c["auc"]}
                                      for name, c in candidates.items()}}
    val_aucs = ", ".join(f"{n} {c['val_auc']:.4f}" for n, c in candidates.items())
    print(f"  {ds}: optimizer {opt} (dense validation AUC: {val_aucs})", flush=True)
    cells.append({"dataset": ds, "optimizer": opt, "method": "dense", "ratio": 1.0, **dense})
    rows.append([ds, opt, "dense", 1.0, dense["memory_ratio"], 0.0, dense["auc"], dense["logloss"], 0.0,
                 dense["samples_per_s"]])
    for ratio in ratios:
        if ratio >= 1.0:
            continue
        for method in methods:
            cell = run_seeds(data, method, ratio, seeds, opt)
            cells.append({"dataset": ds, "optimizer": opt, "method": method, "ratio": ratio, **cell})
            if "error" in cell:
                rows.append([ds, opt, method, ratio, None, None, None, None, None, None])
            else:
                rows.append([ds, opt, method, ratio, cell["memory_ratio"], cell["index_ratio"], cell["auc"],
                             cell["logloss"], cell["auc"] - dense["auc"], cell["samples_per_s"]])
            print(f"  {ds} {method} {ratio}: {cell}", flush=True)
    return rows, cells, selection


def markdown(cells: list[dict]) -> str:
    """The docs table of a results file: per dataset and budget, each method's mean test AUC, its change against
    dense and (in brackets) the bytes it kept; ``n/a`` where the method has no form within the budget."""
    methods = list(dict.fromkeys(c["method"] for c in cells if c["method"] != "dense"))
    out = ["| dataset (dense AUC) | budget | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for ds in dict.fromkeys(c["dataset"] for c in cells):
        dense = next(c for c in cells if c["dataset"] == ds and c["method"] == "dense")
        for ratio in sorted({c["ratio"] for c in cells if c["dataset"] == ds and c["method"] != "dense"},
                            reverse=True):
            row = {c["method"]: c for c in cells if c["dataset"] == ds and c["ratio"] == ratio}
            best = max((c["auc"] for c in row.values() if "auc" in c), default=None)
            cols = []
            for m in methods:
                c = row.get(m)
                if c is None or "auc" not in c:
                    cols.append("n/a")
                    continue
                text = f"{c['auc']:.4f} ({c['auc'] - dense['auc']:+.4f}; {c['memory_ratio']:.3f})"
                cols.append(f"**{text}**" if c["auc"] == best else text)
            out.append(f"| {ds} ({dense['auc']:.4f}) | {ratio:g} | " + " | ".join(cols) + " |")
    return "\n".join(out)


def user_datasets(specs: list[str], arg_specs: list[str]) -> dict[str, dict]:
    """``--data LABEL=LOADER:PATH`` and ``--data-args LABEL=JSON`` as recipe ``data`` sections by label."""
    out: dict[str, dict] = {}
    for spec in specs:
        label, _, rest = spec.partition("=")
        loader, _, path = rest.partition(":")
        if not (label and loader and path):
            raise SystemExit(f"--data {spec!r}: expected LABEL=LOADER:PATH, e.g. frappe=libfm:/data/frappe")
        out[label] = {"name": loader, "path": path, "args": {}}
    for spec in arg_specs:
        label, _, text = spec.partition("=")
        if label not in out:
            raise SystemExit(f"--data-args {spec!r}: no --data labelled {label!r}")
        try:
            args = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--data-args {spec!r}: not JSON ({e})") from None
        if not isinstance(args, dict):
            raise SystemExit(f"--data-args {spec!r}: expected a JSON object of loader arguments")
        out[label]["args"] = args
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(DATASETS),
                        help="built-in datasets to run (default: all, or none when --data is given)")
    parser.add_argument("--data", action="append", default=[], metavar="LABEL=LOADER:PATH",
                        help="also run on your own data: a label, a dataset loader (libfm, csv, parquet, criteo, "
                             "...) and its path, e.g. frappe=libfm:/data/frappe (repeatable)")
    parser.add_argument("--data-args", action="append", default=[], metavar="LABEL=JSON",
                        help="loader arguments of a --data dataset, e.g. 'clicks={\"label\": \"clicked\"}'")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--optimizer", choices=["auto", *OPTIMIZERS], default="auto",
                        help="auto: per dataset, the optimizer whose dense model has the better validation AUC; "
                             "or one optimizer for all (adagrad lr 0.02, adam lr 0.002)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="methods to run (a subset writes fiited_quality_subset.json, not the main table)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="datasets run in this many worker processes (one thread each); results are the same")
    parser.add_argument("--name", default=None, help="results file name (default: fiited_quality, "
                                                     "fiited_quality_<optimizer>, fiited_quality_subset or, with "
                                                     "--data, fiited_quality_user)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the docs table of benchmarks/results/<--name or fiited_quality>.json; run nothing")
    args = parser.parse_args()
    if args.markdown:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{args.name or 'fiited_quality'}.json")
        with open(path) as f:
            print(markdown(json.load(f)["cells"]))
        return
    extra = user_datasets(args.data, args.data_args)
    builtin = args.datasets if args.datasets is not None else ([] if extra else list(DATASETS))
    sources = {**{ds: DATASETS[ds] for ds in builtin}, **extra}
    todo = [ds for ds, data in sources.items() if os.path.exists(data["path"])]
    for ds in set(sources) - set(todo):
        print(f"skipping {ds}: {sources[ds]['path']} not found")
    jobs = [(ds, args.ratios, args.seeds, args.optimizer, args.methods, sources[ds]) for ds in todo]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.starmap(run_dataset, jobs)
    else:
        results = [run_dataset(*job) for job in jobs]
    rows = [r for res in results for r in res[0]]
    cells = [c for res in results for c in res[1]]
    selection = {ds: res[2] for ds, res in zip(todo, results)}
    name = "fiited_quality" if args.optimizer == "auto" else f"fiited_quality_{args.optimizer}"
    if set(args.methods) != set(METHODS):
        name = "fiited_quality_subset"
    if extra:                        # never overwrite the built-in datasets' table with a user's data
        name = "fiited_quality_user"
    name = args.name or name
    optimizers = ", ".join(f"{o['name']} lr {o['lr']}" for o in OPTIMIZERS.values())
    choice = f"per dataset by dense validation AUC among {optimizers}" if args.optimizer == "auto" else \
        f"{args.optimizer} lr {OPTIMIZERS[args.optimizer]['lr']}"
    publish(name, ["dataset", "optimizer", "method", "target", "bytes kept (payload+index)", "index/payload",
                   "mean test AUC", "mean logloss", "dAUC vs dense", "train samples/s"], rows,
            {"cells": cells, "seeds": args.seeds, "optimizer_selection": selection,
             "protocol": f"DLRM dim 64, 3 epochs, batch 256, seeded split 80/10/10; optimizer {choice}"})


if __name__ == "__main__":
    main()
