"""FIITED against the truth: clicks generated from per-row latent vectors of planted, heterogeneous true dimension
(``planted-ctr``). How well do FIITED's kept chunks per row track the planted dimensions (Spearman rank
correlation), and how close is its AUC to an oracle that stores exactly the planted dimensions, at the same bytes?

Setup: 4 fields of 2,000 ids (Zipf 1.05) with planted dimensions drawn from {0, 4, 8, 16, 32}; DLRM with
embedding dim 32, chunk size 4; 1,000,000 samples (80/10/10; at 100,000, about 40 a row, the planted dims were not
learnable: the oracle did not beat dense), 2 epochs at batch 256, Adagrad lr 0.05.

``fiited-per-access`` ranks chunks by their utility per access (``utility: per_access``: the decayed gradient
norm over 1 + the row's decayed access count) instead of the paper's frequency-weighted utility; the
``-no-discount`` variants set ``position_discount: 0`` (scores not divided by ``(chunk + 1) ** 2``), so that the
utility alone decides. ``fiited-magnitude`` ranks chunks by their weight norm at the pruning round
(``utility: magnitude``), ``fiited-gradient-weight`` by the gradient utility times the weight norm (``utility:
gradient_weight``, a bound on the first-order loss change of removing the chunk).

Budget: the oracle's own bytes. The oracle stores ceil(d / 4) chunks for a row of planted dimension d, fixed from
the first step, in the same chunk store (payload + index), and FIITED and uniform get the same total bytes.

    python benchmarks/fiited_planted.py [--seeds 3] [--samples 1000000] [--ids 2000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402

import torch  # noqa: E402

import compresskit  # noqa: E402
from compresskit.data.planted_ctr import PlantedCTR, load_planted_ctr  # noqa: E402
from compresskit.models.dlrm import DLRM  # noqa: E402
from compresskit.plugins.fiited.embedding import convert_embeddings, fiited_modules  # noqa: E402

DIM, CHUNK, FIELDS = 32, 4, 4
VARIANTS = {"fiited-regrow": {"regrow": True}, "fiited-per-access": {"utility": "per_access"},
            "fiited-no-discount": {"position_discount": 0.0},
            "fiited-per-access-no-discount": {"utility": "per_access", "position_discount": 0.0},
            "fiited-magnitude": {"utility": "magnitude"},
            "fiited-gradient-weight": {"utility": "gradient_weight"}}
FIITED_VARIANTS = ["fiited", *VARIANTS]


def oracle_counts(ids: int, seed: int) -> torch.Tensor:
    """Chunks per row of the oracle allocation, ``[fields, ids]``."""
    return (PlantedCTR(ids, FIELDS, DIM, seed=seed).true_dims + CHUNK - 1) // CHUNK


def oracle_dlrm(num_dense: int, cardinalities: list[int], seed: int = 0, **_: object) -> torch.nn.Module:
    """DLRM whose tables are chunk stores holding exactly the planted chunks of every row (the oracle)."""
    torch.manual_seed(seed)
    model = DLRM(num_dense, cardinalities, embedding_dim=DIM, bottom_mlp=[32], top_mlp=[64])
    convert_embeddings(model, CHUNK)
    for (_, m), counts in zip(fiited_modules(model), oracle_counts(cardinalities[0], seed)):
        m.store.shrink_rows(counts)
    return model


def recipe(samples: int, ids: int, seed: int, model: dict, stages: list) -> dict:
    return {"model": model,
            "data": {"name": "planted-ctr", "args": {"num_samples": samples, "num_ids": ids, "fields": FIELDS,
                                                      "dim": DIM}},
            "train": {"epochs": 2, "batch_size": 256, "seed": seed, "progress": False, "threads": 1,
                      "optimizer": {"name": "adagrad", "lr": 0.05}},
            "stages": stages}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()
        return ((ends - counts.double() + 1 + ends) / 2)[inverse]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=2_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense_model = {"name": "dlrm", "args": {"embedding_dim": DIM, "bottom_mlp": [32], "top_mlp": [64]}}
    methods = ["dense", "oracle", *FIITED_VARIANTS, "uniform"]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        oracle = compresskit.run(compresskit.validate_recipe(recipe(
            args.samples, args.ids, seed, {"name": "fiited_planted:oracle_dlrm", "args": {"seed": seed}}, []),
            require_model=True))
        mods = [m for _, m in fiited_modules(oracle.model)]
        stored = sum(m.table_bytes().serving for m in mods)
        ratio = stored / sum(m.num_embeddings * m.embedding_dim * 4 for m in mods)
        truth = oracle_counts(args.ids, seed)
        train_ids = load_planted_ctr(seed=seed, num_samples=args.samples, num_ids=args.ids, fields=FIELDS,
                                     dim=DIM).train.tensors[1]
        accesses = torch.stack([torch.bincount(train_ids[:, f], minlength=args.ids) for f in range(FIELDS)])
        frequent = accesses >= torch.quantile(accesses.float().flatten(), 0.9)   # the 10% most accessed rows
        runs = {"oracle": oracle}
        for method in ("dense", *FIITED_VARIANTS, "uniform"):
            stage = [] if method == "dense" else [{"plugin": "fiited", "chunk_size": CHUNK,
                                                  "method": "uniform" if method == "uniform" else "fiited",
                                                  "target_memory_ratio": ratio, **VARIANTS.get(method, {})}]
            runs[method] = compresskit.run(compresskit.validate_recipe(
                recipe(args.samples, args.ids, seed, dense_model, stage), require_model=True))
        for method, result in runs.items():
            cell = {"auc": result.report["training"]["test"]["auc"], "ratio": ratio}
            if method in ("oracle", *FIITED_VARIANTS):
                kept = torch.stack([m.row_chunk_counts() for _, m in fiited_modules(result.model)])
                cell["spearman_all"] = spearman(kept.flatten(), truth.flatten())
                cell["spearman_frequent"] = spearman(kept[frequent], truth[frequent])
                cell["mean_chunks_by_planted"] = {int(d): float(kept[truth == d].float().mean())
                                                  for d in torch.unique(truth)}
                cell["memory_ratio"] = result.report["stages"][0]["memory_ratio"] if result.report["stages"] \
                    else ratio
            results[method].append(cell)
        print(f"  seed {seed}: " + ", ".join(f"{m} {results[m][-1]['auc']:.4f}" for m in methods), flush=True)
    rows, cells = [], []
    dense_auc = statistics.mean(c["auc"] for c in results["dense"])
    oracle_auc = statistics.mean(c["auc"] for c in results["oracle"])
    for method in methods:
        cs = results[method]
        auc = statistics.mean(c["auc"] for c in cs)
        rho = statistics.mean(c["spearman_all"] for c in cs) if "spearman_all" in cs[0] else None
        rho_frequent = statistics.mean(c["spearman_frequent"] for c in cs) if "spearman_all" in cs[0] else None
        by = ({d: statistics.mean(c["mean_chunks_by_planted"][d] for c in cs) for d in cs[0]["mean_chunks_by_planted"]}
              if "mean_chunks_by_planted" in cs[0] else {})
        rows.append([method, 1.0 if method == "dense" else cs[0]["ratio"], auc, auc - dense_auc, auc - oracle_auc,
                     rho, rho_frequent, " ".join(f"{d}:{v:.2f}" for d, v in by.items())])
        cells.append({"method": method, "auc": auc, "auc_per_seed": [c["auc"] for c in cs], "spearman": rho,
                      "spearman_frequent_rows": rho_frequent,
                      "mean_chunks_by_planted_chunks": by})
    publish("fiited_planted", ["method", "bytes (of dense)", "test AUC", "vs dense", "vs oracle",
                               "Spearman(kept, planted)", "... 10% most accessed rows",
                               "mean chunks kept by planted chunks"], rows,
            {"seeds": args.seeds, "samples": args.samples, "ids_per_field": args.ids, "fields": FIELDS,
             "dim": DIM, "chunk_size": CHUNK, "threads": 1, "cells": cells})


if __name__ == "__main__":
    main()
