"""HyPar: communication of the planned partition vs the three baselines for every paper network on 16
accelerators, and planner run time on long chains up to 150 weighted layers and 64 accelerators.

    python benchmarks/hypar.py [--batch 256] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402

from compresskit.plugins.hypar.graph import PAPER_NETWORKS, paper_network, synthetic_chain  # noqa: E402
from compresskit.plugins.hypar.search import baselines, hierarchical_plan, joint_plan  # noqa: E402


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--accelerators", type=int, default=16)
    args = parser.parse_args()
    levels = args.accelerators.bit_length() - 1
    rows, nets = [], []
    for name in PAPER_NETWORKS:
        layers = paper_network(name)
        hier = hierarchical_plan(layers, args.batch, levels)
        joint = joint_plan(layers, args.batch, levels)
        base = baselines(layers, args.batch, levels)
        gb = 4 / 2**30
        rows.append([name, len(layers), hier.elements * gb, joint.elements * gb,
                     base["all data parallel"].elements / hier.elements,
                     base["all model parallel"].elements / hier.elements,
                     base["one weird trick"].elements / hier.elements])
        nets.append({"network": name, "layers": len(layers), "hypar_elements": hier.elements,
                     "joint_elements": joint.elements, **{k: v.elements for k, v in base.items()}})
    publish("hypar", ["network", "weighted layers", "HyPar GiB/step", "joint GiB/step", "all-DP / HyPar",
                      "all-MP / HyPar", "OWT / HyPar"], rows,
            {"batch": args.batch, "accelerators": args.accelerators, "dtype": "float32", "networks": nets})
    timing_rows, timing = [], []
    for n_layers in (19, 50, 100, 150):
        for acc in (16, 64):
            lv = acc.bit_length() - 1
            layers = synthetic_chain(n_layers)
            t_h = _best_time(lambda layers=layers, lv=lv: hierarchical_plan(layers, args.batch, lv))
            t_j = _best_time(lambda layers=layers, lv=lv: joint_plan(layers, args.batch, lv))
            timing_rows.append([n_layers, acc, t_h * 1000, t_j * 1000])
            timing.append({"layers": n_layers, "accelerators": acc, "hierarchical_s": t_h, "joint_s": t_j})
    print()
    publish("hypar_planner_time", ["weighted layers", "accelerators", "hierarchical ms", "joint ms"], timing_rows,
            {"target_seconds": 1.0, "timings": timing})


if __name__ == "__main__":
    main()
