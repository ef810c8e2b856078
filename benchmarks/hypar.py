"""HyPar: communication of the planned partition vs the baselines for every network on 16 accelerators (the paper's
partitions [dp, mp] and AccPar's [dp, mp, mp_out]), the modelled step time and energy against all-DP next to the
paper's 3.39x / 1.51x, residual and Inception graphs (exact DAG search vs the chain approximation), planner run time
on long chains, and measured step time of planned models on 2 and 4 gloo processes.

    python benchmarks/hypar.py [--batch 256] [--accelerators 16] [--measured-batch 64] [--steps 5] [--only measured]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402

from compresskit.plugins.hypar.cost import StateSpace, level_terms  # noqa: E402
from compresskit.plugins.hypar.dag import chain_approximation, dag_cost, dag_plan, inception_graph, resnet_graph  # noqa: E402,E501
from compresskit.plugins.hypar.perf import (HMC_ACCELERATOR, PAPER_HEADLINE, SOURCES, compare, geomean,  # noqa: E402
                                            step_estimate)
from compresskit.plugins.hypar.chain import PAPER_EVALUATED, PAPER_NETWORKS, paper_network, synthetic_chain  # noqa: E402
from compresskit.plugins.hypar.search import baselines, hierarchical_plan, joint_plan  # noqa: E402

PARTITION_SETS = {"paper": ["dp", "mp"], "accpar": ["dp", "mp", "mp_out"]}


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def communication(batch: int, accelerators: int) -> None:
    """Elements per step of HyPar (hierarchical and joint) and the baselines, per network and partition set."""
    levels = accelerators.bit_length() - 1
    rows, nets = [], []
    for set_name, names in PARTITION_SETS.items():
        space = StateSpace.of(names, levels)
        for name in PAPER_NETWORKS:
            layers = paper_network(name)
            hier = hierarchical_plan(layers, batch, space)
            joint = joint_plan(layers, batch, space)
            base = baselines(layers, batch, space)
            mp_best = min(v.elements for k, v in base.items() if k.startswith("all model parallel"))
            gb = 4 / 2**30
            rows.append([set_name, name + ("" if name in PAPER_EVALUATED else " (ours)"), len(layers),
                         hier.elements * gb, joint.elements * gb,
                         base["all data parallel"].elements / hier.elements, mp_best / hier.elements,
                         base["one weird trick"].elements / hier.elements])
            nets.append({"partitions": names, "network": name, "paper_evaluated": name in PAPER_EVALUATED,
                         "layers": len(layers), "hypar_elements": hier.elements, "joint_elements": joint.elements,
                         **{k: v.elements for k, v in base.items()}})
    for set_name in PARTITION_SETS:
        ratios = [r[5] for r in rows if r[0] == set_name and not r[1].endswith("(ours)")]
        rows.append([set_name, "geomean (paper's 10)", "", "", "", math.prod(ratios) ** (1 / len(ratios)), "", ""])
    publish("hypar", ["partitions", "network", "weighted layers", "HyPar GiB/step", "joint GiB/step",
                      "all-DP / HyPar", "best all-MP / HyPar", "OWT / HyPar"], rows,
            {"batch": batch, "accelerators": accelerators, "dtype": "float32", "networks": nets})


def step_model(batch: int, accelerators: int) -> None:
    """Modelled step time and energy of HyPar against all-DP per paper network, and their geometric means next to
    the paper's 3.39x / 1.51x (both with the gradient exchange overlapped and without)."""
    levels = accelerators.bit_length() - 1
    space = StateSpace.of(PARTITION_SETS["paper"], levels)
    rows, nets = [], []
    means: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    for name in PAPER_EVALUATED:
        layers = paper_network(name)
        plans = {"hypar": hierarchical_plan(layers, batch, space),
                 "all data parallel": baselines(layers, batch, space)["all data parallel"]}
        for overlap in (True, False):
            spec = dataclasses.replace(HMC_ACCELERATOR, overlap=overlap)
            est = {k: step_estimate(layers, level_terms(layers, p.states, batch, p.space),
                                    [p.choices(i) for i in range(len(layers))], batch, accelerators, spec)
                   for k, p in plans.items()}
            ratio = compare(est)["hypar"]
            means[overlap][0].append(ratio["speedup"])
            means[overlap][1].append(ratio["energy_efficiency"])
            h, d = est["hypar"], est["all data parallel"]
            rows.append([name, "yes" if overlap else "no", d.seconds * 1e3, h.seconds * 1e3, ratio["speedup"],
                         d.joules, h.joules, ratio["energy_efficiency"],
                         f"{100 * d.comm_seconds / d.seconds:.0f}%"])
            nets.append({"network": name, "overlap": overlap, "dp": dataclasses.asdict(d),
                         "hypar": dataclasses.asdict(h), **ratio})
    for overlap, (spd, eff) in means.items():
        rows.append(["geomean", "yes" if overlap else "no", "", "", geomean(spd), "", "", geomean(eff), ""])
    rows.append(["paper (HPCA 2019)", "", "", "", PAPER_HEADLINE["speedup"], "", "",
                 PAPER_HEADLINE["energy_efficiency"], ""])
    publish("hypar_step_model", ["network", "overlap", "all-DP ms", "HyPar ms", "speedup", "all-DP J", "HyPar J",
                                 "energy efficiency", "all-DP link share"], rows,
            {"batch": batch, "accelerators": accelerators, "accelerator": dataclasses.asdict(HMC_ACCELERATOR),
             "sources": SOURCES, "paper": PAPER_HEADLINE, "networks": nets})


def graphs(batch: int, accelerators: int) -> None:
    """Residual and Inception graphs: all-DP, the chain approximation and the exact DAG plan, charged on the
    whole graph (shortcuts and concat parts included)."""
    levels = accelerators.bit_length() - 1
    rows, out = [], []
    for name, graph in (("resnet-18", resnet_graph(18)), ("resnet-50", resnet_graph(50)),
                        ("inception 3a+3b", inception_graph())):
        for set_name, names in PARTITION_SETS.items():
            space = StateSpace.of(names, levels)
            dp = dag_cost(graph, [space.uniform(0)] * graph.number_of_nodes(), batch, space)
            chain = chain_approximation(graph, batch, space).elements
            start = time.perf_counter()
            try:
                exact = dag_plan(graph, batch, space).elements
            except ValueError as e:
                rows.append([name, set_name, graph.number_of_nodes(), graph.number_of_edges(), dp / chain, "-",
                             "-", str(e)[:40]])
                continue
            seconds = time.perf_counter() - start
            rows.append([name, set_name, graph.number_of_nodes(), graph.number_of_edges(), dp / chain, dp / exact,
                         chain / exact, f"{seconds * 1000:.0f} ms"])
            out.append({"graph": name, "partitions": names, "all_dp": dp, "chain": chain, "exact": exact,
                        "seconds": seconds})
    publish("hypar_graphs", ["graph", "partitions", "layers", "edges", "all-DP / chain", "all-DP / exact",
                             "chain / exact", "exact search"], rows,
            {"batch": batch, "accelerators": accelerators, "graphs": out})


def planner_time(batch: int) -> None:
    """Planner run time on long synthetic chains."""
    timing_rows, timing = [], []
    for n_layers in (19, 50, 100, 150):
        for acc in (16, 64):
            for set_name, names in PARTITION_SETS.items():
                space = StateSpace.of(names, acc.bit_length() - 1)
                layers = synthetic_chain(n_layers)
                t_h = _best_time(lambda layers=layers, space=space: hierarchical_plan(layers, batch, space))
                t_j = _best_time(lambda layers=layers, space=space: joint_plan(layers, batch, space))
                timing_rows.append([n_layers, acc, set_name, t_h * 1000, t_j * 1000])
                timing.append({"layers": n_layers, "accelerators": acc, "partitions": names,
                               "hierarchical_s": t_h, "joint_s": t_j})
    publish("hypar_planner_time", ["weighted layers", "accelerators", "partitions", "hierarchical ms", "joint ms"],
            timing_rows, {"target_seconds": 1.0, "timings": timing})


# models sized for a 2-core machine, shaped like the paper's SFC (wide fully connected) and VGG's classifier
MEASURED_MODELS = {
    "SFC-like 1024-4096x3-16": [1024, 4096, 4096, 4096, 16],
    "VGG-classifier-like 6272-2048-2048-1000": [6272, 2048, 2048, 1000],
}


def _mlp(widths: list[int]):
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods: list = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i + 2 < len(widths) else [])
    return nn.Sequential(*mods)


def _timed_steps(rank: int, world: int, widths: list[int], batch: int, plan, steps: int) -> dict:
    """One process: ``steps`` timed training steps (after 2 warm-up steps) of the plan, or of torch DDP when
    ``plan`` is None. Returns per-step seconds (the slowest process's) and elements received per step."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from compresskit.plugins.hypar.parallel import parallelize, train_step

    x = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(1))
    target = torch.randn(batch, widths[-1], generator=torch.Generator().manual_seed(2))
    loss_fn = nn.functional.mse_loss
    if plan is None:
        model = nn.parallel.DistributedDataParallel(_mlp(widths))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        rows = slice(rank * batch // world, (rank + 1) * batch // world)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[rows]), target[rows]).backward()
            optimizer.step()
    else:
        parallel = parallelize(_mlp(widths), plan)
        optimizer = torch.optim.SGD(parallel.parameters(), lr=1e-3)

        def step() -> None:
            train_step(parallel, x, target, loss_fn, optimizer)
    times = []
    for i in range(steps + 2):
        if i == 2 and plan is not None:
            parallel.counter.reset()
        dist.barrier()
        start = time.perf_counter()
        step()
        took = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(float(took))
    received = float(parallel.received().terms.sum()) / steps if plan is not None else None
    return {"seconds": times, "received_per_step": received}


def measured(batch: int, steps: int) -> None:
    """Measured step time of a HyPar plan on 2 and 4 gloo processes (one torch thread each) against all-DP run by
    the same executor and against torch DDP, for an SFC-like and a VGG-classifier-like model."""
    import statistics

    from compresskit.distributed.local import run_local
    from compresskit.plugins.hypar.plan import fixed_plan
    from compresskit.plugins.hypar.plugin import HyparConfig, plan_layers

    import torch

    rows, out = [], []
    for name, widths in MEASURED_MODELS.items():
        layers = layers_from_model_of(widths, batch)
        for world in (2, 4):
            cfg = HyparConfig(accelerators=world, batch=batch)
            hypar = plan_layers(layers, cfg, name)
            dp = fixed_plan(layers, [["dp"] * hypar.levels] * len(layers), batch)
            times = {}
            for label, plan in (("HyPar", hypar), ("all-DP", dp), ("DDP", None)):
                result = run_local(_timed_steps, world, (widths, batch, plan, steps), timeout=600)[0]
                times[label] = statistics.median(result["seconds"])
                if plan is not None:
                    out.append({"model": name, "processes": world, "plan": label,
                                "choices": [l.choices for l in plan.layers], "seconds": result["seconds"],
                                "received_per_step": result["received_per_step"],
                                "paper_model_elements": plan.total_elements["hypar"],
                                "executed_elements": plan.executed_elements["hypar"]})
                    times[label + " received"] = result["received_per_step"]
                    times[label + " model"] = plan.total_elements["hypar"]
                else:
                    out.append({"model": name, "processes": world, "plan": "torch DDP", "seconds": result["seconds"]})
            rows.append([name, world, " ".join("/".join(l.choices) for l in hypar.layers),
                         times["HyPar"] * 1e3, times["all-DP"] * 1e3, times["DDP"] * 1e3,
                         times["all-DP"] / times["HyPar"], times["DDP"] / times["HyPar"],
                         times["all-DP received"] / times["HyPar received"],
                         times["HyPar received"] / times["HyPar model"]])
    publish("hypar_measured", ["model", "processes", "HyPar plan", "HyPar ms", "all-DP ms", "DDP ms",
                               "all-DP / HyPar time", "DDP / HyPar time", "all-DP / HyPar elements",
                               "HyPar received / paper model"], rows,
            {"batch": batch, "steps": steps, "threads_per_process": 1, "cores": os.cpu_count(),
             "torch": torch.__version__, "backend": "gloo on 127.0.0.1", "runs": out})


def layers_from_model_of(widths: list[int], batch: int):
    """The plan's layer chain of the measured MLP."""
    import torch

    from compresskit.plugins.hypar.chain import layers_from_model

    return layers_from_model(_mlp(widths), (torch.zeros(batch, widths[0]),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--accelerators", type=int, default=16)
    parser.add_argument("--measured-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=["measured"], help="run only this table")
    args = parser.parse_args()
    if args.only == "measured":
        measured(args.measured_batch, args.steps)
        return
    communication(args.batch, args.accelerators)
    print()
    step_model(args.batch, args.accelerators)
    print()
    graphs(args.batch, args.accelerators)
    print()
    planner_time(args.batch)
    print()
    measured(args.measured_batch, args.steps)


if __name__ == "__main__":
    main()
