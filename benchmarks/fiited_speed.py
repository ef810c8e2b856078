"""FIITED speed and memory against what recommendation engineers run today.

Parts (``--part``, default all), each at every thread count of ``--threads`` (default 1 and 2), every method
interleaved in one process so that the ratios compare like with like on a shared machine:

* ``table``: one training step (forward + backward + SGD update) of one table, 1M x 64 fp32, 4096 bags of
  Zipf(1.1) ids, pooling 1 and 20. Peers: FBGEMM's CPU TBE (``fbgemm-gpu-cpu``, fused EXACT_SGD) and
  ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SGD``. FIITED (``chunk_size: 4``, fused SGD, chunk utilities
  tracked as in training) unpruned and with 90% of the chunks pruned; its pure-torch fallback; and, labelled as
  such, ``nn.EmbeddingBag`` with a dense gradient (no one trains large tables that way). Then the same with
  Adagrad (TBE's EXACT_ADAGRAD, ``torch.optim.Adagrad`` on the sparse gradient, FIITED's fused Adagrad), without
  the two reference rows.
* ``criteo``: the same step over the 26 Criteo-Kaggle tables (cardinalities scaled by ``--criteo-scale``, default
  0.1, so that every method's copy fits in memory at once), one id per table per sample.
* ``dlrm``: samples/s of a whole DLRM training step (bottom MLP, 26 tables, dot interaction, top MLP; dense MLPs
  with torch SGD) with FIITED tables against the same DLRM on one TBE.
* ``lookup``: inference lookups (forward, no autograd) of one 1M x 64 table, 4096 bags of Zipf(1.1) ids, pooling 1
  and 20: FIITED's FP32 chunks against INT8 / INT4 chunks holding the same chunks (unpruned, and 90% pruned; INT8
  also with a 5% FP32 hot-row cache), next to ``nn.EmbeddingBag`` (FP32) and FBGEMM's INT8 inference TBE. Then one
  training step (fused SGD) of FP32 against INT8 chunks, 90% pruned.
* ``rss``: the Criteo-Kaggle-sized DLRM (33.8M rows, 8.05 GiB of dense embeddings) trained with lazily allocated
  FIITED tables at a 10% budget (payload + index), in a child process per thread count: peak RSS, steps/s,
  pruning rounds, and the share of rows first seen in the second half of training that end up with chunks.

    python benchmarks/fiited_speed.py [--part table criteo dlrm lookup rss] [--threads 1 2] [--rss-steps 1200]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402
from peers import DLRMOnTBE, int8_tbe_available, make_int8_tbe, make_tbe, tbe_available, tbe_inputs  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compresskit.data.synthetic_ctr import (KAGGLE_CARDINALITIES, NUM_DENSE, SyntheticCTR,  # noqa: E402
                                           scaled_cardinalities)
from compresskit.models.dlrm import DLRM  # noqa: E402
import compresskit  # noqa: E402
from compresskit.plugins.fiited import FiitedEmbeddingBag, kernels  # noqa: E402
from compresskit.plugins.fiited.plugin import FiitedConfig  # noqa: E402
from compresskit.plugins.fiited.row_index import index_bytes as row_index_bytes  # noqa: E402

DIM, CHUNK, LR, BATCH = 64, 4, 0.01, 4096


# ------------------------------------------------------------------------------------------------ methods
def fiited_tables(weights: list[torch.Tensor], pruned: float, seed: int = 0, optimizer: str = "sgd"
                  ) -> list[FiitedEmbeddingBag]:
    """FIITED copies of ``weights`` with a fused ``optimizer`` and utilities on; ``pruned``: fraction of chunks
    removed (random row prefixes whose mean is ``1 - pruned`` of a row), then packed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for w in weights:
        m = FiitedEmbeddingBag(w.shape[0], DIM, chunk_size=CHUNK, weight=w, optimizer=optimizer, lr=LR)
        m.track_utility(0.99)
        if pruned:
            c = m.num_chunks
            keep = torch.rand(w.shape[0], generator=gen) * 2 * (1 - pruned) * c
            m.store.shrink_rows(keep.round().clamp(0, c).long())
        out.append(m)
    return out


OPTIMIZER_NAMES = {"sgd": "SGD", "adagrad": "Adagrad"}


def step_fns(weights: list[torch.Tensor], optimizer: str = "sgd", references: bool = True
             ) -> dict[str, Callable[[list[torch.Tensor], torch.Tensor], None]]:
    """One training step per method over tables initialised from ``weights`` (``optimizer`` sgd or adagrad, lr
    0.01, loss = sum); ``references``: also the dense-gradient table and FIITED's pure-torch kernels."""
    tables = [(w.shape[0], DIM) for w in weights]
    name = OPTIMIZER_NAMES[optimizer]
    fns: dict[str, Callable] = {}
    if tbe_available():
        tbe = make_tbe(tables, optimizer, LR, weights=weights)

        def run_tbe(ids, offsets):
            idx, off = tbe_inputs(ids, [offsets] * len(ids))
            tbe(idx, off).sum().backward()
        fns[f"FBGEMM TBE (fused {name})"] = run_tbe
    for sparse in (True, False) if references else (True,):
        bags = [nn.EmbeddingBag.from_pretrained(w.clone(), freeze=False, mode="sum", sparse=sparse) for w in weights]
        params = [b.weight for b in bags]
        opt = torch.optim.SGD(params, lr=LR) if optimizer == "sgd" else torch.optim.Adagrad(params, lr=LR)

        def run_bags(ids, offsets, bags=bags, opt=opt):
            opt.zero_grad(set_to_none=True)
            sum(b(i, offsets).sum() for b, i in zip(bags, ids)).backward()
            opt.step()
        fns[f"nn.EmbeddingBag(sparse=True) + {name}" if sparse else f"nn.EmbeddingBag dense gradient + {name}"] = \
            run_bags
    variants = [("FIITED unpruned", 0.0, True), ("FIITED 90% pruned", 0.9, True)]
    if references:
        variants.append(("FIITED unpruned, pure-torch kernels", 0.0, False))
    for label, pruned, native in variants:
        mods = fiited_tables(weights, pruned, optimizer=optimizer)

        def run_fiited(ids, offsets, mods=mods, native=native):
            kernels.use_native(native)
            sum(m(i, offsets).sum() for m, i in zip(mods, ids)).backward()
            kernels.use_native(True)
        fns[label] = run_fiited
    return fns


def time_interleaved(fns: dict[str, Callable], batches: list[tuple[list[torch.Tensor], torch.Tensor]],
                     rounds: int, steps: int) -> dict[str, float]:
    """Median ms per step of every method, timed in interleaved rounds of ``steps`` steps."""
    for fn in fns.values():
        for ids, off in batches[:2]:
            fn(ids, off)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for i in range(steps):
                ids, off = batches[i % len(batches)]
                fn(ids, off)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


PEERS = tuple(peer for name in OPTIMIZER_NAMES.values()
              for peer in (f"FBGEMM TBE (fused {name})", f"nn.EmbeddingBag(sparse=True) + {name}"))


def table_rows(part: str, setting: str, threads: int, ms: dict[str, float], rows: list, cells: list) -> None:
    """Table rows and JSON cells with each method's ratio to the faster peer of the same run."""
    best = min(ms[p] for p in PEERS if p in ms)
    for name, t in ms.items():
        rows.append([part, setting, threads, name, t, best / t])
        cells.append({"part": part, "setting": setting, "threads": threads, "method": name, "ms_per_step": t,
                      "speed_vs_faster_peer": best / t})
    print(f"  {part} {setting} threads={threads}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
          flush=True)


def sampler_ids(cards: list[int], n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [SyntheticCTR([c], seed=0)._sample_ids(n, c, gen) for c in cards]


def part_table(threads: int, rows: list, cells: list) -> None:
    """One table's training step with fused SGD (and the reference rows), then with fused Adagrad."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1_000_000, DIM, generator=gen) * 0.01]
    batches = {pooling: [(sampler_ids([1_000_000], BATCH * pooling, gen), torch.arange(0, BATCH * pooling, pooling))
                         for _ in range(4)] for pooling in (1, 20)}
    for optimizer in OPTIMIZER_NAMES:
        fns = step_fns(weights, optimizer, references=optimizer == "sgd")
        for pooling in (1, 20):
            slow = {k: v for k, v in fns.items() if "dense gradient" in k or "pure-torch" in k}
            ms = time_interleaved({k: v for k, v in fns.items() if k not in slow}, batches[pooling], rounds=7,
                                  steps=10)
            if slow:
                ms.update(time_interleaved(slow, batches[pooling], rounds=3, steps=3))
            setting = f"pooling {pooling}" + ("" if optimizer == "sgd" else f", {OPTIMIZER_NAMES[optimizer]}")
            table_rows("table 1M x 64", setting, threads, ms, rows, cells)
        del fns
        gc.collect()


def quantized_copy(m: FiitedEmbeddingBag, storage: str, cache_rows: float, hot: torch.Tensor) -> FiitedEmbeddingBag:
    """A copy of ``m`` (same chunks) stored as ``storage``, its cache filled by the accesses ``hot``."""
    q = FiitedEmbeddingBag(m.num_embeddings, DIM, CHUNK, optimizer="sgd", lr=LR)
    q.track_utility(0.99)     # as m: utilities tracked, as in training
    q.load_state_dict(m.state_dict())
    q.set_precision(storage, cache_rows)
    if q.cache is not None:
        q.cache.record(hot)
        q.refresh_cache()
    return q


def part_lookup(threads: int, rows: list, cells: list) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1_000_000, DIM, generator=gen) * 0.01
    hot = sampler_ids([1_000_000], 200_000, gen)[0]
    for pruned in (0.0, 0.9):
        fp32 = fiited_tables([weight], pruned)[0]
        tables = {"FIITED fp32 chunks": fp32,
                  "FIITED int8 chunks": quantized_copy(fp32, "int8", 0.0, hot),
                  "FIITED int8 chunks + 5% fp32 cache": quantized_copy(fp32, "int8", 0.05, hot),
                  "FIITED int4 chunks": quantized_copy(fp32, "int4", 0.0, hot)}
        fns = {}
        if not pruned:
            bag = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
            fns["nn.EmbeddingBag fp32"] = lambda ids, off, bag=bag: bag(ids[0], off)
            if int8_tbe_available():
                tbe = make_int8_tbe([(1_000_000, DIM)])
                fns["FBGEMM int8 inference TBE"] = lambda ids, off, tbe=tbe: tbe(*tbe_inputs(ids, [off]))
        for name, m in tables.items():
            m.eval()
            fns[name] = lambda ids, off, m=m: m(ids[0], off)
        for pooling in (1, 20):
            batches = [(sampler_ids([1_000_000], BATCH * pooling, gen), torch.arange(0, BATCH * pooling, pooling))
                       for _ in range(4)]
            with torch.no_grad():
                ms = time_interleaved(fns, batches, rounds=7, steps=10)
            setting = f"{'unpruned' if not pruned else '90% pruned'}, pooling {pooling}"
            base = ms["FIITED fp32 chunks"]
            for name, t in ms.items():
                rows.append(["lookup 1M x 64", setting, threads, name, t, base / t])
                cells.append({"part": "lookup", "setting": setting, "threads": threads, "method": name,
                              "ms_per_lookup": t, "speed_vs_fp32_chunks": base / t})
            print(f"  lookup {setting} threads={threads}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
                  flush=True)
        if pruned:   # the training step: the INT8 update re-quantizes in torch ops after the native backward
            train = {}
            for name, storage in (("FIITED fp32 chunks, train step", None), ("FIITED int8 chunks, train step",
                                                                              "int8")):
                m = fiited_tables([weight], pruned)[0] if storage is None else \
                    quantized_copy(fiited_tables([weight], pruned)[0], storage, 0.0, hot)
                train[name] = lambda ids, off, m=m: m(ids[0], off).sum().backward()
            batches = [(sampler_ids([1_000_000], BATCH * 20, gen), torch.arange(0, BATCH * 20, 20))
                       for _ in range(4)]
            ms = time_interleaved(train, batches, rounds=5, steps=5)
            base = ms["FIITED fp32 chunks, train step"]
            for name, t in ms.items():
                rows.append(["train step 1M x 64", "90% pruned, pooling 20", threads, name, t, base / t])
                cells.append({"part": "lookup", "setting": "train step, 90% pruned, pooling 20", "threads": threads,
                              "method": name, "ms_per_step": t, "speed_vs_fp32_chunks": base / t})
            print(f"  train 90% pruned threads={threads}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
                  flush=True)


def part_criteo(threads: int, scale: float, rows: list, cells: list) -> None:
    gen = torch.Generator().manual_seed(0)
    cards = scaled_cardinalities(scale)
    weights = [torch.randn(c, DIM, generator=gen) * 0.01 for c in cards]
    fns = {k: v for k, v in step_fns(weights).items() if "pure-torch" not in k}
    batches = [(sampler_ids(cards, BATCH, gen), torch.arange(BATCH)) for _ in range(4)]
    ms = time_interleaved(fns, batches, rounds=5, steps=5)
    table_rows(f"26 Criteo tables x{scale}", "pooling 1", threads, ms, rows, cells)


def part_dlrm(threads: int, scale: float, rows: list, cells: list) -> None:
    cards = scaled_cardinalities(scale)
    data = SyntheticCTR(cards, seed=0).stream(2048, seed=1)
    batches = [next(data) for _ in range(4)]
    models: dict[str, Callable] = {}
    loss_fn = nn.BCEWithLogitsLoss()

    def trainer(model, params):
        opt = torch.optim.SGD(params, lr=LR)

        def step(dense, sparse, label):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(dense, sparse), label).backward()
            opt.step()
        return step
    torch.manual_seed(0)
    if tbe_available():
        tbe_model = DLRMOnTBE(NUM_DENSE, cards, embedding_dim=DIM, bottom_mlp=[512, 256], top_mlp=[512, 256],
                              optimizer="sgd", lr=LR)
        models["DLRM on FBGEMM TBE (fused SGD)"] = trainer(tbe_model, tbe_model.dense_parameters())
    for name, pruned in [("DLRM, FIITED tables unpruned", 0.0), ("DLRM, FIITED tables 90% pruned", 0.9)]:
        torch.manual_seed(0)
        model = DLRM(NUM_DENSE, cards, embedding_dim=DIM, bottom_mlp=[512, 256], top_mlp=[512, 256])
        for i, m in enumerate(fiited_tables([e.weight.detach() for e in model.embeddings], pruned)):
            model.embeddings[i] = m
        models[name] = trainer(model, [p for p in model.parameters() if p.requires_grad])
    fns = {k: (lambda ids, off, f=f: f(*ids)) for k, f in models.items()}
    ms = time_interleaved(fns, [(b, None) for b in batches], rounds=5, steps=5)
    base = ms.get("DLRM on FBGEMM TBE (fused SGD)")
    for name, t in ms.items():
        sps = 2048 / t * 1e3
        ratio = base / t if base else float("nan")
        rows.append(["DLRM step (batch 2048)", f"26 tables x{scale}", threads, name, t, ratio])
        cells.append({"part": "dlrm", "threads": threads, "method": name, "ms_per_step": t, "samples_per_s": sps,
                      "speed_vs_tbe_dlrm": ratio})
    print(f"  dlrm threads={threads}: " + ", ".join(f"{k} {2048 / v * 1e3:,.0f} samples/s" for k, v in ms.items()),
          flush=True)


# ------------------------------------------------------------------------------------------------ RSS child
def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that high-water mark over from
    the parent through fork and exec, so a child started by a large parent would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child(steps: int, batch: int, ratio: float, chunk_size: int, interval: int) -> dict:
    """Train the Kaggle-sized DLRM with lazy FIITED tables; returns measured numbers (runs in a child process)."""
    torch.manual_seed(0)
    chunks = DIM // chunk_size
    rows_total = sum(KAGGLE_CARDINALITIES)
    dense_bytes = rows_total * DIM * 4
    index_bytes = sum(row_index_bytes(c) for c in KAGGLE_CARDINALITIES)
    budget_chunks = int((ratio * dense_bytes - index_bytes) // (chunk_size * 4))
    small = [c for c in KAGGLE_CARDINALITIES if c * chunks <= 200_000]   # small tables: whole, never pruned out
    big_share = (budget_chunks - sum(small) * chunks) / ((rows_total - sum(small)) * chunks)

    def factory(rows: int, d: int) -> FiitedEmbeddingBag:
        capacity = rows * chunks if rows * chunks <= 200_000 else int(big_share * rows * chunks)
        return FiitedEmbeddingBag(rows, d, chunk_size=chunk_size, lazy=True, capacity=capacity, init_std=0.01,
                                  seed=rows)

    model = DLRM(NUM_DENSE, KAGGLE_CARDINALITIES, embedding_dim=DIM, bottom_mlp=[128], top_mlp=[128, 64],
                 tables=[factory(rows, DIM) for rows in KAGGLE_CARDINALITIES])
    cfg = FiitedConfig(target_memory_ratio=ratio, chunk_size=chunk_size, lazy=True, fused_optimizer="sgd",
                       fused_lr=0.05, interval=interval, start_step=interval, headroom=0.1)
    compression = compresskit.prepare(model, cfg, total_steps=steps)
    plugin = compression.plugins[0]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    compression.attach_optimizer(optimizer)
    touched = [torch.zeros(m.num_embeddings, dtype=torch.bool) for m in model.embeddings]
    data = SyntheticCTR(KAGGLE_CARDINALITIES, seed=0).stream(batch, seed=1)
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    losses, mid_touched = [], None
    for step in range(1, steps + 1):
        dense, sparse, label = next(data)
        if step == steps // 2 + 1:
            mid_touched = [t.clone() for t in touched]
        for t, col in zip(touched, sparse.t()):
            t[col] = True
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(dense, sparse), label)
        loss.backward()
        compression.after_backward()
        optimizer.step()
        compression.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    late = sum(int((t & ~m).sum()) for t, m in zip(touched, mid_touched))
    late_kept = sum(int((t & ~m & (e.row_chunk_counts() > 0)).sum())
                    for t, m, e in zip(touched, mid_touched, model.embeddings))
    mem = plugin.memory()
    return {"steps": steps, "batch": batch, "seconds": seconds, "steps_per_second": steps / seconds,
            "threads": torch.get_num_threads(),
            "peak_rss_bytes": peak_rss_bytes(),
            "dense_bytes": dense_bytes, "payload_bytes": mem["payload"], "index_bytes": mem["index"],
            "training_state_bytes": mem["training"], "stored_chunks": plugin.stored_chunks(),
            "pruning_rounds": len(plugin.rounds), "late_rows": late, "late_rows_with_chunks": late_kept,
            "late_share_with_chunks": late_kept / max(late, 1), "first_loss": sum(losses[:20]) / 20,
            "last_loss": sum(losses[-20:]) / 20, "chunk_size": chunk_size, "rows": rows_total,
            "instrumentation_bytes": sum(t.numel() for t in touched) * 2}


def part_rss(threads: int, steps: int, rows: list, cells: list) -> None:
    proc = subprocess.run([sys.executable, __file__, "--rss-child", "--rss-steps", str(steps)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    rows.append([threads, res["rows"], res["dense_bytes"] / gib, (res["payload_bytes"] + res["index_bytes"]) / gib,
                 res["training_state_bytes"] / gib, res["peak_rss_bytes"] / gib, res["steps"], res["steps_per_second"],
                 res["pruning_rounds"], f"{res['late_share_with_chunks']:.1%} of {res['late_rows']:,}",
                 f"{res['first_loss']:.4f}->{res['last_loss']:.4f}"])
    cells.append(res)
    print(f"  rss threads={threads}: {res}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["table", "criteo", "dlrm", "lookup", "rss"],
                        choices=["table", "criteo", "dlrm", "lookup", "rss"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--criteo-scale", type=float, default=0.1)
    parser.add_argument("--rss-steps", type=int, default=1200)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_steps, 2048, 0.1, 16, 25)))
        return
    if not tbe_available():
        print("fbgemm-gpu-cpu is not installed: the TBE columns are missing (pip install fbgemm-gpu-cpu==1.8.0)")
    rows: list = []
    cells: list = []
    speed_parts = [p for p in args.part if p not in ("rss", "lookup")]
    for threads in args.threads if speed_parts else []:
        torch.set_num_threads(threads)
        if "table" in args.part:
            part_table(threads, rows, cells)
        if "criteo" in args.part:
            part_criteo(threads, args.criteo_scale, rows, cells)
        if "dlrm" in args.part:
            part_dlrm(threads, args.criteo_scale, rows, cells)
    if rows:
        publish("fiited_throughput", ["benchmark", "setting", "threads", "method", "ms / step",
                                      "speed vs faster peer (TBE for DLRM)"], rows,
                {"cells": cells, "dim": DIM, "chunk_size": CHUNK, "batch": BATCH, "ids": "Zipf 1.1", "lr": LR})
    if "lookup" in args.part:
        rows, cells = [], []
        for threads in args.threads:
            torch.set_num_threads(threads)
            part_lookup(threads, rows, cells)
        publish("fiited_lookup", ["benchmark", "setting", "threads", "method", "ms", "speed vs fp32 chunks"], rows,
                {"cells": cells, "dim": DIM, "chunk_size": CHUNK, "batch": BATCH, "ids": "Zipf 1.1",
                 "target": "int8 chunks within 1.2x of fp32 chunks (same chunks)"})
    if "rss" in args.part:
        rows, cells = [], []
        for threads in args.threads:
            part_rss(threads, args.rss_steps, rows, cells)
        publish("fiited_rss", ["threads", "rows", "dense GiB", "FIITED payload+index GiB", "training state GiB",
                               "peak RSS GiB", "steps", "steps/s", "pruning rounds", "late rows with chunks",
                               "loss first->last 20"], rows,
                {"cells": cells, "target_peak_rss_bytes": 2 * 10**9})


if __name__ == "__main__":
    main()
