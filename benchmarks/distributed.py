"""Distributed DLRM on the Criteo-shaped synthetic clicks: throughput and per-rank peak RSS on 1, 2 and 4 ranks,
FIITED against the same model with plain ``nn.EmbeddingBag(sparse=True)`` tables, and the bytes between ranks.

Every configuration runs ``compresskit apply recipe.yaml --nproc N`` (torch.distributed.run, gloo on 127.0.0.1,
one thread per rank) in a fresh process tree, so RSS and timings are that run's own. Ratios compare runs of this
invocation. On this 2-core machine 4 ranks oversubscribe the cores: their throughput says little about 4 real
machines, their bytes and memory do.

Communication is checked two ways, per training step and rank:
* bytes counted on every collective compresskit issues (the all-to-alls, all-gathers, all-reduces, and DDP's
  bucket all-reduces through a comm hook) against the model of ``compresskit.distributed.comm_model``;
* bytes on the wire: the loopback interface's transmitted bytes (``/proc/net/dev``), differenced between a short
  and a long run of the same recipe so set-up, evaluation and the final gather cancel, against the same model
  with a ring all-reduce's ``2 (N-1) / N`` factor. This needs an otherwise quiet loopback.

On 2 ranks each variant also runs ``--repeats`` alternating pairs with ``distributed.prefetch_ids`` on and off
(every batch's ids exchanged in its own forward instead of during the previous batch's backward and step): the rows
"ids sent ahead / not" are the median of the pairs' samples/s ratios. "table bytes max/mean" is the ranks' balance
at the end (a FIITED run re-places its tables once pruning ends: before -> after).

Usage: python benchmarks/distributed.py [--samples 60000] [--steps 40] [--scale 0.02]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, publish  # noqa: E402

from compresskit.distributed.comm_model import ring_wire_factor  # noqa: E402


def recipe(variant: str, samples: int, steps: int, scale: float, batch: int, prefetch: bool = True) -> dict:
    """The benchmark recipe: DLRM on synthetic-ctr, FIITED at 10% or plain sparse EmbeddingBag tables; ``prefetch``:
    the next batch's ids sent during this one (``distributed.prefetch_ids``)."""
    out = {
        "model": {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [64, 32], "top_mlp": [64, 32],
                                           "sparse": variant == "embeddingbag"}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": samples, "cardinality_scale": scale}},
        "train": {"epochs": 100, "max_steps": steps, "batch_size": batch, "progress": False, "threads": 1,
                  "checkpoint_every": 10_000, "optimizer": {"name": "adagrad", "lr": 0.05}},
        "stages": [],
        "distributed": {"timeout_s": 600, "prefetch_ids": prefetch},
    }
    if variant == "fiited":
        out["stages"] = [{"plugin": "fiited", "target_memory_ratio": 0.1, "chunk_size": 4, "interval": 5,
                          "start_step": 5, "end_step": max(6, steps // 2)}]
    return out


def loopback_tx() -> int | None:
    """Bytes the loopback interface has transmitted (None where /proc/net/dev is unreadable)."""
    try:
        for line in open("/proc/net/dev"):
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    except OSError:
        return None
    return None


def apply(spec: dict, nproc: int, workdir: str) -> tuple[dict, int | None]:
    """Run one configuration; returns its report and the loopback bytes it caused."""
    path = os.path.join(workdir, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    out = os.path.join(workdir, "out")
    before = loopback_tx()
    proc = subprocess.run([sys.executable, "-m", "compresskit", "apply", path, "--out", out, "--nproc", str(nproc)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = loopback_tx()
    if proc.returncode != 0:
        raise SystemExit(f"run failed (nproc {nproc}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return report, (after - before) if before is not None and after is not None else None


def modelled_wire(report: dict) -> float:
    """Bytes per step all ranks put on the wire by the model (ring all-reduce)."""
    ranks = report["distributed"]["ranks"]
    world = report["distributed"]["world"]
    return sum(r["model_bytes_per_step"]["all_to_all"] + r["model_bytes_per_step"]["all_gather"]
               + ring_wire_factor(world) * r["model_bytes_per_step"]["all_reduce"] for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--scale", type=float, default=0.02, help="cardinalities = Criteo Kaggle x scale")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of 2-rank runs with the ids sent "
                                                                "ahead and without")
    args = parser.parse_args()

    rows, runs, wire, prefetch_effect = [], {}, [], {}
    for nproc in args.ranks:
        for variant in ("embeddingbag", "fiited"):
            with tempfile.TemporaryDirectory() as tmp:
                report, lo_bytes = apply(recipe(variant, args.samples, args.steps, args.scale, args.batch), nproc,
                                         tmp)
            training = report["training"]
            throughput = training["steps"] * args.batch / training["train_seconds"]
            dist = report.get("distributed")
            rss = [r["peak_rss_bytes"] for r in dist["ranks"]] if dist else [report["run"]["peak_rss_bytes"]]
            held = [r["model_bytes"] for r in dist["ranks"]] if dist else [report["memory"]["total"]]
            runs[(variant, nproc)] = {"throughput": throughput, "rss": rss, "report": report, "lo": lo_bytes}
            print(f"  {variant} on {nproc} rank(s): {throughput:.0f} samples/s, peak RSS "
                  f"{max(rss) / 2**20:.0f} MiB", flush=True)
            counted = modelled = None
            if dist:
                counted = sum(sum(r["sent_bytes_per_step"].values()) for r in dist["ranks"])
                modelled = sum(sum(r["model_bytes_per_step"].values()) for r in dist["ranks"])
            balance = f"{dist['table_bytes_max_over_mean']:.2f}" if dist else "-"
            if dist and dist.get("replacements"):
                moved = dist["replacements"][0]
                balance = f"{moved['max_over_mean_before']:.2f} -> {dist['table_bytes_max_over_mean']:.2f}"
            rows.append([variant, nproc, round(throughput), max(rss) // 2**20,
                         max(held) // 2**10, balance, round(counted) if counted else "-", modelled or "-",
                         f"{counted / modelled:.3f}" if counted else "-"])
        if nproc == 2:  # ids sent ahead or not: alternating runs, the median of their paired ratios
            for variant in ("embeddingbag", "fiited"):
                ratios = []
                for _ in range(args.repeats):
                    pair = []
                    for prefetch in (True, False):
                        with tempfile.TemporaryDirectory() as tmp:
                            report, _ = apply(recipe(variant, args.samples, args.steps, args.scale, args.batch,
                                                     prefetch), nproc, tmp)
                        pair.append(report["training"]["steps"] * args.batch / report["training"]["train_seconds"])
                    ratios.append(pair[0] / pair[1])
                prefetch_effect[variant] = ratios
                print(f"  {variant} on 2 ranks, samples/s with ids sent ahead over without: "
                      f"{', '.join(f'{r:.2f}' for r in ratios)}", flush=True)
        if nproc > 1:   # wire check: a short run of the FIITED recipe, differenced against the long one
            with tempfile.TemporaryDirectory() as tmp:
                short, lo_short = apply(recipe("fiited", args.samples, args.steps // 2, args.scale, args.batch),
                                        nproc, tmp)
            long_run = runs[("fiited", nproc)]
            if lo_short is not None and long_run["lo"] is not None:
                steps = long_run["report"]["training"]["steps"] - short["training"]["steps"]
                measured = (long_run["lo"] - lo_short) / steps
                wire.append({"ranks": nproc, "loopback_bytes_per_step": measured,
                             "modelled_wire_bytes_per_step": modelled_wire(long_run["report"]),
                             "ratio": measured / modelled_wire(long_run["report"])})

    for nproc in args.ranks:
        fiited, plain = runs[("fiited", nproc)], runs[("embeddingbag", nproc)]
        rows.append(["FIITED / EmbeddingBag", nproc, f"{fiited['throughput'] / plain['throughput']:.2f}x",
                     f"{max(fiited['rss']) / max(plain['rss']):.2f}x", "", "", "", "", ""])
    for variant, ratios in prefetch_effect.items():
        rows.append([f"{variant}: ids sent ahead / not", 2, f"{statistics.median(ratios):.2f}x", "", "", "", "", "",
                     ""])
    print()
    publish("distributed", ["tables", "ranks", "samples/s", "peak RSS MiB (max rank)", "model KiB held (max rank)",
                            "table bytes max/mean", "counted B/step", "modelled B/step", "counted/model"], rows,
            {"args": vars(args), "wire_check": wire, "prefetch_ratios": prefetch_effect,
             "note": "one thread per rank; 4 ranks oversubscribe the 2-core machine"})
    for w in wire:
        print(f"loopback wire bytes per step on {w['ranks']} ranks: {w['loopback_bytes_per_step']:.0f} measured, "
              f"{w['modelled_wire_bytes_per_step']:.0f} modelled ({w['ratio']:.3f}x)")


if __name__ == "__main__":
    main()
