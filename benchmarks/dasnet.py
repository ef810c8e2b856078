"""DASNet: (1) accuracy of LeNet-5 on scikit-learn's bundled 8x8 digits (upsampled to 32x32) dense vs WTA at
25/50/75% channel sparsity of the conv feature maps (plus WTA on the FC neurons too, and 2-block WTA, at 50%),
mean of 3 seeds; (2) CPU inference latency of a VGG-11- and a ResNet-20-shaped net
(32x32 inputs, 50% sparsity) dense vs the sparse execution path at batch 1 and 32, as ratios from the same run.

    python benchmarks/dasnet.py [--seeds 3] [--epochs 15]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import publish  # noqa: E402

import torch  # noqa: E402

import compresskit  # noqa: E402
from compresskit.models.resnet_cifar import resnet_cifar  # noqa: E402
from compresskit.models.vgg import vgg  # noqa: E402
from compresskit.plugins.dasnet import insert_wta, to_sparse_execution  # noqa: E402
from compresskit.recipe import validate_recipe  # noqa: E402


def accuracy(sparsity: float | None, blocks: int | None, layers: list[str], seed: int, epochs: int) -> float:
    """Test accuracy of LeNet-5 on digits, trained with WTA at ``sparsity`` after ``layers`` (None = dense)."""
    stages = [] if sparsity is None else [{"plugin": "dasnet", "sparsity": sparsity, "blocks": blocks,
                                           "layers": layers, "sparse_execution": False}]
    recipe = {"model": {"name": "lenet5"}, "data": {"name": "digits"},
              "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "progress": False,
                        "optimizer": {"name": "adam", "lr": 0.002}}, "stages": stages}
    rec, st = validate_recipe(recipe, require_model=True)
    return compresskit.run(rec, st).report["training"]["test"]["accuracy"]


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median latency of ``model(x)`` in ms after warm-up."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--part", choices=["all", "accuracy", "speed"], default="all")
    args = parser.parse_args()
    if args.part in ("all", "accuracy"):
        accuracy_table(args)
    if args.part in ("all", "speed"):
        speed_table()


def accuracy_table(args: argparse.Namespace) -> None:
    """Part 1: test accuracy per WTA setting."""

    rows, cells = [], []
    conv = ["features.*"]
    settings = [("dense", None, None, []), ("WTA 25% conv channels", 0.25, None, conv),
                ("WTA 50% conv channels", 0.5, None, conv), ("WTA 75% conv channels", 0.75, None, conv),
                ("WTA 50% conv channels + FC neurons", 0.5, None, []),
                ("WTA 50% conv channels, 2 blocks", 0.5, 2, conv)]
    dense_acc = None
    for label, sparsity, blocks, layers in settings:
        accs = [accuracy(sparsity, blocks, layers, seed, args.epochs) for seed in range(args.seeds)]
        mean = statistics.mean(accs)
        dense_acc = mean if sparsity is None else dense_acc
        rows.append([label, mean, min(accs), max(accs), (mean - dense_acc) * 100])
        cells.append({"setting": label, "sparsity": sparsity, "blocks": blocks, "layers": layers or "all ReLU",
                      "accuracies": accs})
        print(f"  {label}: {accs}", flush=True)
    publish("dasnet_accuracy", ["setting", "mean test acc", "min", "max", "points vs dense"], rows,
            {"dataset": "scikit-learn digits (8x8 upsampled to 32x32), 70/10/20 split", "model": "LeNet-5",
             "epochs": args.epochs, "cells": cells})


def speed_table() -> None:
    """Part 2: inference latency, dense vs the sparse execution path, measured in the same run."""
    nets = {"VGG-11": lambda: vgg("vgg11"), "ResNet-20 (width 32)": lambda: resnet_cifar(20, width=32)}
    speed_rows, speed = [], []
    for net_name, ctor in nets.items():
        torch.manual_seed(0)
        dense = ctor().eval()
        for blocks in (None, 2):
            wta = copy.deepcopy(dense)
            insert_wta(wta, 0.5, blocks=blocks)
            wta.eval()
            sparse = copy.deepcopy(wta)
            decisions = to_sparse_execution(sparse, (torch.randn(32, 3, 32, 32),), batch_sizes=(1, 32),
                                            blocks=blocks)
            for batch in (1, 32):
                x = torch.randn(batch, 3, 32, 32)
                repeats = 40 if batch == 1 else 10
                t_dense = latency_ms(dense, x, repeats)
                t_masked = latency_ms(wta, x, repeats)
                t_sparse = latency_ms(sparse, x, repeats)
                with torch.no_grad():
                    err = float((sparse(x) - wta(x)).abs().max())
                label = "per channel" if blocks is None else f"{blocks} blocks"
                speed_rows.append([net_name, label, batch, t_dense, t_masked, t_sparse, t_dense / t_sparse])
                speed.append({"net": net_name, "wta": label, "batch": batch, "dense_ms": t_dense,
                              "wta_masked_ms": t_masked, "sparse_ms": t_sparse, "speedup": t_dense / t_sparse,
                              "max_abs_error": err, "sparse_layers": len(decisions)})
    publish("dasnet_speed", ["net", "WTA", "batch", "dense ms", "WTA masked ms", "sparse path ms",
                             "dense / sparse"], speed_rows,
            {"sparsity": 0.5, "input": "3x32x32", "threads": torch.get_num_threads(), "runs": speed})


if __name__ == "__main__":
    main()
