"""FIITED speed and memory.

(1) forward+backward throughput of a FiitedEmbeddingBag against nn.EmbeddingBag at equal shapes (1M rows, dim 64,
    Zipf ids, batch 4096) with 0%, 50% and 90% of the chunks pruned, as ratios from the same run;
(2) peak RSS of a DLRM with Criteo-Kaggle-shaped tables (33.8M rows, dim 64: 8.6 GB dense) trained for a few
    hundred steps with FIITED at a 10% payload budget (lazy allocation, sparse gradients, SGD), measured in a
    child process so the number is that run's own.

    python benchmarks/fiited_speed.py [--steps 300] [--batch 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compresskit.data.synthetic_ctr import KAGGLE_CARDINALITIES, NUM_DENSE, SyntheticCTR  # noqa: E402
from compresskit.plugin import RunContext  # noqa: E402
from compresskit.plugins.fiited import FiitedEmbeddingBag, FiitedPlugin  # noqa: E402
from compresskit.plugins.fiited.plugin import FiitedConfig  # noqa: E402
from compresskit.schema import build  # noqa: E402


def zipf_ids(n: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """Zipf(1.1)-like ids via the synthetic generator's sampler."""
    return SyntheticCTR([rows], seed=0)._sample_ids(n, rows, gen)


def throughput(rows: int, dim: int, batch: int, pruned: float, repeats: int) -> tuple[float, float]:
    """(dense samples/s, FIITED samples/s) for forward+backward at ``pruned`` fraction of chunks removed."""
    torch.manual_seed(0)
    dense = nn.EmbeddingBag(rows, dim, mode="sum")
    fiited = FiitedEmbeddingBag.from_dense(dense, chunk_size=8)
    if pruned > 0:
        r, c, _ = fiited.store.entries()
        keep_chunks = torch.randint(0, fiited.num_chunks + 1, (rows,))   # random prefix lengths
        scale = (1 - pruned) * fiited.num_chunks / keep_chunks.float().mean()
        keep_chunks = (keep_chunks.float() * scale).round().clamp(0, fiited.num_chunks).long()
        drop = c >= keep_chunks[r]
        fiited.store.remove(r[drop], c[drop])
        fiited.store.compact()
    gen = torch.Generator().manual_seed(1)
    batches = [zipf_ids(batch, rows, gen) for _ in range(4)]
    offsets = torch.arange(batch)

    def run(module: nn.Module) -> float:
        for ids in batches[:2]:
            module(ids, offsets).sum().backward()
        start = time.perf_counter()
        for i in range(repeats):
            module.zero_grad(set_to_none=True)
            module(batches[i % 4], offsets).sum().backward()
        return repeats * batch / (time.perf_counter() - start)

    return run(dense), run(fiited)


def rss_child(steps: int, batch: int, ratio: float, chunk_size: int) -> dict:
    """Train the Kaggle-shaped DLRM with lazy FIITED bags; returns measured numbers (runs in a child process)."""
    from compresskit.models.dlrm import DLRM

    torch.manual_seed(0)
    dim = 64
    chunks = dim // chunk_size
    total_chunks = sum(KAGGLE_CARDINALITIES) * chunks
    small = [c for c in KAGGLE_CARDINALITIES if c * chunks <= 200_000]
    big_fraction = (ratio * total_chunks - sum(small) * chunks) / (sum(KAGGLE_CARDINALITIES) - sum(small)) / chunks

    def factory(rows: int, d: int) -> FiitedEmbeddingBag:
        capacity = rows * chunks if rows * chunks <= 200_000 else int(big_fraction * rows * chunks)
        return FiitedEmbeddingBag(rows, d, chunk_size=chunk_size, lazy=True, capacity=capacity, sparse=True,
                                  init_std=0.01, seed=rows)

    model = DLRM(NUM_DENSE, KAGGLE_CARDINALITIES, embedding_dim=dim, bottom_mlp=[128], top_mlp=[128, 64],
                 embedding_factory=factory)
    cfg = build(FiitedConfig, {"target_memory_ratio": ratio, "chunk_size": chunk_size, "lazy": True,
                               "sparse_grad": True, "interval": 25, "start_step": 25, "headroom": 0.1})
    plugin = FiitedPlugin(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = RunContext(model=model, optimizer=optimizer, total_steps=steps)
    plugin.apply(model, ctx)
    data = SyntheticCTR(KAGGLE_CARDINALITIES, seed=0).stream(batch, seed=1)
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    losses = []
    for step in range(1, steps + 1):
        dense, sparse, label = next(data)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(dense, sparse), label)
        loss.backward()
        plugin.on_after_backward(step, ctx)
        optimizer.step()
        plugin.on_step(step, ctx)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    mem = plugin.memory()
    return {"steps": steps, "batch": batch, "seconds": seconds, "steps_per_second": steps / seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dense_payload_bytes": plugin.dense_payload_bytes, "payload_bytes": mem["payload"],
            "index_bytes": mem["index"], "stats_bytes": mem["stats"], "stored_chunks": plugin.stored_chunks(),
            "pruning_rounds": len(plugin.rounds), "first_loss": sum(losses[:20]) / 20,
            "last_loss": sum(losses[-20:]) / 20, "chunk_size": chunk_size, "rows": sum(KAGGLE_CARDINALITIES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.steps, args.batch, 0.1, args.chunk_size)))
        return

    rows, cells = [], []
    for pruned in (0.0, 0.5, 0.9):
        dense_sps, fiited_sps = throughput(args.rows, 64, 4096, pruned, repeats=10)
        rows.append([f"{int(pruned * 100)}%", dense_sps, fiited_sps, fiited_sps / dense_sps])
        cells.append({"pruned": pruned, "dense_samples_per_s": dense_sps, "fiited_samples_per_s": fiited_sps,
                      "ratio": fiited_sps / dense_sps})
        print(f"  pruned {pruned}: {cells[-1]}", flush=True)
    publish("fiited_throughput", ["chunks pruned", "nn.EmbeddingBag samples/s", "FIITED samples/s",
                                  "FIITED / dense"], rows,
            {"rows": args.rows, "dim": 64, "chunk_size": 8, "batch": 4096, "ids": "Zipf 1.1", "cells": cells})

    print("\ntraining the Criteo-Kaggle-shaped DLRM with FIITED at 10% (child process)...", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--rss-child", "--steps", str(args.steps), "--batch",
                           str(args.batch), "--chunk-size", str(args.chunk_size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    publish("fiited_rss", ["rows", "dense payload GiB", "FIITED payload GiB", "index+stats GiB", "peak RSS GiB",
                           "steps", "steps/s", "loss first->last 20"],
            [[res["rows"], res["dense_payload_bytes"] / gib, res["payload_bytes"] / gib,
              (res["index_bytes"] + res["stats_bytes"]) / gib, res["peak_rss_bytes"] / gib, res["steps"],
              res["steps_per_second"], f"{res['first_loss']:.4f}->{res['last_loss']:.4f}"]],
            {"result": res, "target_peak_rss_bytes": 2 * gib})


if __name__ == "__main__":
    main()
