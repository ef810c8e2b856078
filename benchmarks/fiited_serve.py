"""Serving lookups of packed FIITED tables against what a recommendation engineer serves today.

Inference only (no autograd), 4096 bags of Zipf(1.1) ids a batch, pooling 1 and 20, at each thread count of
``--threads`` (default 1 and 2); every method interleaved in one process, median of ``--rounds`` rounds of
``--steps`` batches, so the ratios compare like with like on a shared machine. Baselines, the strongest a user would
serve instead: ``nn.EmbeddingBag`` FP32 and FBGEMM's INT8 inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``,
INT8 rows with an FP16 scale and bias each; ``pip install -e ".[bench]"``). Ratios are speed against each peer and
against the faster of the two (> 1: FIITED is faster).

Tables: one 1M x 64 table, and the 26 Criteo-Kaggle tables (dim 64, cardinalities scaled by ``--criteo-scale``,
default 0.1) served as 26 modules (``nn.EmbeddingBag`` and FIITED; the TBE serves them in one module), and, at
pooling 1, as the one ``PackedTables`` module a packed DLRM serves them with (table-batched: one op call; it takes
DLRM's ``[batch, 26]`` ids, stacked from the per-table ids inside the timed call, and its output is concatenated
as the others'). A run of some ``--part``s keeps the other parts' cells of the previous JSON (each cell's ratios
come from its own run).
FIITED, ``chunk_size`` 4: unpruned and with 90% of the chunks pruned (random row prefixes), as packed tables in FP32,
INT8 and INT4 (and INT8 with a 5% FP32 hot-row cache, pruned), each with its bytes against the FP32 dense table.
The 1M x 64 table, 90% pruned, is also exported (``torch.export``, saved and loaded) and timed the same way.

    python benchmarks/fiited_serve.py [--part single criteo] [--threads 1 2] [--rounds 9] [--steps 8]
    python benchmarks/fiited_serve.py --markdown     # the docs tables, from benchmarks/results/fiited_serve.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402
from fiited_speed import CHUNK, DIM, fiited_tables, quantized_copy, sampler_ids  # noqa: E402
from peers import int8_tbe_available, make_int8_tbe, tbe_inputs  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compresskit.data.synthetic_ctr import scaled_cardinalities  # noqa: E402
from compresskit.export import load_program, save_program  # noqa: E402
from compresskit.models.tables import EmbeddingTables  # noqa: E402
from compresskit.plugins.fiited import kernels  # noqa: E402

BATCH = 4096
BAG, TBE = "nn.EmbeddingBag fp32", "FBGEMM int8 inference TBE"


class Tables(nn.Module):
    """Several single-table modules called one after the other, outputs concatenated (as a DLRM serves them)."""

    def __init__(self, tables: list[nn.Module]) -> None:
        super().__init__()
        self.tables = nn.ModuleList(tables)

    def forward(self, ids: list[torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(i, offsets) for t, i in zip(self.tables, ids)], dim=1)


def packed_variants(weights: list[torch.Tensor], hot: list[torch.Tensor]) -> dict[str, tuple[nn.Module, int]]:
    """FIITED packed tables (name -> (module over all tables, bytes)), built one variant at a time."""
    out: dict[str, tuple[nn.Module, int]] = {}
    for pruned in (0.0, 0.9):
        label = "90% pruned" if pruned else "unpruned"
        trained = fiited_tables(weights, pruned)
        kinds = [("fp32", None, 0.0), ("int8", "int8", 0.0), ("int4", "int4", 0.0)]
        if pruned:
            kinds.append(("int8 + 5% fp32 cache", "int8", 0.05))
        for kind, storage, cache in kinds:
            tables = [(m if storage is None else quantized_copy(m, storage, cache, h)).to_packed()
                      for m, h in zip(trained, hot)]
            out[f"FIITED packed {kind}, {label}"] = (Tables(tables).eval(),
                                                     sum(t.table_bytes().serving for t in tables))
            batched = EmbeddingTables(tables).to_batched() if len(tables) > 1 else None
            if batched is not None:
                out[f"FIITED packed {kind}, {label}, table-batched"] = (batched.eval(),
                                                                        batched.table_bytes().serving)
        del trained
        gc.collect()
    return out


def exported(module: nn.Module, ids: list[torch.Tensor], offsets: torch.Tensor) -> nn.Module:
    """``module`` through torch.export, saved and loaded back (what a serving process runs)."""
    program = torch.export.export(module, (ids, offsets),
                                  dynamic_shapes=([{0: torch.export.Dim.AUTO}] * len(ids), {0: torch.export.Dim.AUTO}))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "table.pt2")
        save_program(program, path)
        return load_program(path).module()


def time_interleaved(fns: dict[str, Callable], batches: list, rounds: int, steps: int) -> dict[str, float]:
    """Median ms per batch of every method, timed in interleaved rounds."""
    with torch.no_grad():
        for fn in fns.values():
            for b in batches[:2]:
                fn(*b)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for i in range(steps):
                    fn(*batches[i % len(batches)])
                times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run_part(part: str, cards: list[int], threads_list: list[int], rounds: int, steps: int, rows: list,
             cells: list) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(c, DIM, generator=gen) * 0.01 for c in cards]
    dense_bytes = sum(w.numel() * 4 for w in weights)
    hot = [sampler_ids([c], 50_000, gen)[0] for c in cards]
    methods: dict[str, tuple[Callable, int]] = {}
    bags = Tables([nn.EmbeddingBag.from_pretrained(w, mode="sum") for w in weights])
    methods[BAG] = (lambda ids, off: bags(ids, off), dense_bytes)
    if int8_tbe_available():
        tbe = make_int8_tbe([(c, DIM) for c in cards])
        tbe_bytes = sum(c * (DIM + 4) for c in cards)       # INT8 codes + FP16 scale and bias a row
        methods[TBE] = (lambda ids, off: tbe(*tbe_inputs(ids, [off] * len(ids))), tbe_bytes)
    single_id = set()      # the table-batched module takes one id per table and sample (pooling 1)
    for name, (module, size) in packed_variants(weights, hot).items():
        if name.endswith("table-batched"):
            methods[name] = (lambda ids, off, m=module: torch.cat(m(torch.stack(ids, 1)), 1), size)
            single_id.add(name)
            continue
        methods[name] = (lambda ids, off, m=module: m(ids, off), size)
        if part == "single" and name == "FIITED packed fp32, 90% pruned":
            sample = (sampler_ids(cards, 64, gen), torch.arange(0, 64))
            program = exported(module, *sample)
            methods["FIITED packed fp32, 90% pruned, torch.export .pt2"] = (lambda ids, off, p=program: p(ids, off),
                                                                            size)
    label = "1M x 64" if part == "single" else f"{len(cards)} Criteo tables x 64"
    for threads in threads_list:
        torch.set_num_threads(threads)
        for pooling in (1, 20):
            batches = [(sampler_ids(cards, BATCH * pooling, gen), torch.arange(0, BATCH * pooling, pooling))
                       for _ in range(4)]
            ms = time_interleaved({k: f for k, (f, _) in methods.items() if pooling == 1 or k not in single_id},
                                  batches, rounds, steps)
            peers = [ms[p] for p in (BAG, TBE) if p in ms]
            for name, t in ms.items():
                size = methods[name][1]
                row = {"tables": label, "pooling": pooling, "threads": threads, "method": name, "ms": t,
                       "vs_embedding_bag": ms[BAG] / t, "vs_int8_tbe": ms[TBE] / t if TBE in ms else None,
                       "vs_faster_peer": min(peers) / t, "bytes": size, "bytes_of_fp32": size / dense_bytes}
                cells.append(row)
                rows.append([label, pooling, threads, name, t, row["vs_embedding_bag"],
                             row["vs_int8_tbe"] if row["vs_int8_tbe"] is not None else float("nan"),
                             row["vs_faster_peer"], row["bytes_of_fp32"]])
            print(f"  {label} pooling {pooling} threads {threads}: " +
                  ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)


def markdown(cells: list[dict]) -> str:
    """docs/fiited.md's serving tables from the JSON cells: per table set, a row per method, a column per pooling and
    thread count, each cell the time and (in brackets) the faster baseline's time over it."""
    out = []
    for tables in dict.fromkeys(c["tables"] for c in cells):
        mine = [c for c in cells if c["tables"] == tables]
        keys = sorted({(c["pooling"], c["threads"]) for c in mine})
        out.append(f"**{tables}**\n")
        out.append("| method | bytes of fp32 | " + " | ".join(f"pooling {p}, {t} thread{'s' * (t > 1)}"
                                                             for p, t in keys) + " |")
        out.append("|---|---|" + "---|" * len(keys))
        for method in dict.fromkeys(c["method"] for c in mine):
            row = {(c["pooling"], c["threads"]): c for c in mine if c["method"] == method}
            first = next(iter(row.values()))
            out.append(f"| {method} | {first['bytes_of_fp32']:.3f} | " + " | ".join(
                f"{row[k]['ms']:.3f} ms ({row[k]['vs_faster_peer']:.2f}x)" if k in row else "" for k in keys) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", default=["single", "criteo"], choices=["single", "criteo"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--criteo-scale", type=float, default=0.1)
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables of benchmarks/results/fiited_serve.json as docs/fiited.md has them; "
                             "run nothing")
    args = parser.parse_args()
    if args.markdown:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fiited_serve.json")) as f:
            print(markdown(json.load(f)["cells"]))
        return
    rows: list = []
    cells: list = []
    native = kernels.native_kernels() is not None
    print(f"native kernels: {'yes' if native else 'no (pure-torch fallback)'}; FBGEMM int8 TBE: "
          f"{'yes' if int8_tbe_available() else 'not installed'}")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for part in args.part:
        cards = [1_000_000] if part == "single" else scaled_cardinalities(args.criteo_scale)
        run_part(part, cards, args.threads, args.rounds, args.steps, rows, cells)
        gc.collect()
    for cell in cells:
        cell["run"] = stamp
    previous = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fiited_serve.json")
    if os.path.exists(previous):   # the parts not run this time keep their cells
        ran = {c["tables"] for c in cells}
        with open(previous) as f:
            kept = [c for c in json.load(f)["cells"] if c["tables"] not in ran]
        cells[:0] = kept
        rows[:0] = [[c["tables"], c["pooling"], c["threads"], c["method"], c["ms"], c["vs_embedding_bag"],
                     c["vs_int8_tbe"] if c["vs_int8_tbe"] is not None else float("nan"), c["vs_faster_peer"],
                     c["bytes_of_fp32"]] for c in kept]
    publish("fiited_serve", ["tables", "pooling", "threads", "method", "ms", "vs nn.EmbeddingBag", "vs int8 TBE",
                             "vs faster peer", "bytes of fp32"], rows,
            {"cells": cells, "native_kernels": native, "batch": BATCH, "chunk_size": CHUNK,
             "criteo_scale": args.criteo_scale, "rounds": args.rounds, "steps": args.steps})


if __name__ == "__main__":
    main()
