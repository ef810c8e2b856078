"""DASNet: (1) accuracy of LeNet-5 on scikit-learn's bundled 8x8 digits (upsampled to 32x32) dense vs WTA at 25/50/75%
channel sparsity of the conv feature maps (plus WTA on the FC neurons too, and 2-block WTA, at 50%), mean of 3
seeds; (2) CPU inference latency of a VGG-11- and ResNet-20-shaped nets (32x32 inputs, 50% sparsity) dense vs the
sparse execution path at batch 1 and 32, as ratios from the same run. The dense baseline is timed five ways: as
PyTorch runs it, with every conv forced onto oneDNN (the kernel the sparse path uses), with BatchNorm folded into
the convs (torch.fx) on oneDNN, BatchNorm-folded in channels-last memory format, and BatchNorm-folded with kernels
prepacked for oneDNN (as the sparse path's prepacked convs run); "best dense / sparse" divides the fastest of the
five by the sparse time. Latencies are medians from ``torch.utils.benchmark`` (``common.interleaved_medians_ms``:
the models take turns in every round). The speed part runs three times, each in a fresh process (the settings are
process wide) that converts (tunes) and times at its thread count: at 1 and 2 threads with glibc's default
allocator, and at 2 threads with ``compresskit.keep_freed_memory()`` (freed activations stay in the heap instead of
being page-faulted in again on every call).

    python benchmarks/dasnet.py [--part all|accuracy|speed] [--seeds 3] [--epochs 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import interleaved_medians_ms, publish  # noqa: E402
from torch.fx.experimental.optimization import fuse  # noqa: E402

import compresskit  # noqa: E402
from compresskit.models.resnet_cifar import resnet_cifar  # noqa: E402
from compresskit.models.vgg import vgg  # noqa: E402
from compresskit.plugins.dasnet import (insert_wta, native, native_batch_sizes, onednn,  # noqa: E402
                                        prepacked_batch_sizes, to_sparse_execution, tuned_dense_batch_sizes)
from compresskit.plugins.dasnet.fuse import folded_batchnorms  # noqa: E402
from compresskit.recipe import validate_recipe  # noqa: E402


def accuracy(sparsity: float | None, blocks: int | None, layers: list[str], seed: int, epochs: int) -> float:
    """Test accuracy of LeNet-5 on digits, trained with WTA at ``sparsity`` after ``layers`` (None = dense)."""
    stages = [] if sparsity is None else [{"plugin": "dasnet", "sparsity": sparsity, "blocks": blocks,
                                           "layers": layers, "sparse_execution": "never"}]
    recipe = {"model": {"name": "lenet5"}, "data": {"name": "digits"},
              "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "progress": False,
                        "optimizer": {"name": "adam", "lr": 0.002}}, "stages": stages}
    return compresskit.run(validate_recipe(recipe, require_model=True)).report["training"]["test"]["accuracy"]


class OneDNNConv2d(torch.nn.Conv2d):
    """A dense Conv2d always run on oneDNN: the dense baseline with the same kernel the sparse path uses
    (``onednn.conv2d``; ``F.conv2d`` where the private operators are unavailable or switched off)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn.conv2d(x, self.weight, self.bias, self)


class PrepackedConv2d(torch.nn.Conv2d):
    """A dense Conv2d on oneDNN with its kernel prepacked once (channels-last compute), as the sparse path's
    prepacked convolutions run (``onednn.prepack_conv_weight``; the plain kernel where it cannot prepack)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "_packed" not in self.__dict__:
            self.__dict__["_packed"] = onednn.prepack_conv_weight(self.weight, self, x.shape)
        packed = self.__dict__["_packed"]
        return onednn.conv2d(x, self.weight if packed is None else packed, self.bias, self)


def dense_on_onednn(model: torch.nn.Module, prepacked: bool = False) -> torch.nn.Module:
    """A copy of ``model`` whose groups=1 convolutions always use oneDNN (with prepacked kernels if asked)."""
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if type(m) is torch.nn.Conv2d and m.groups == 1:
            m.__class__ = PrepackedConv2d if prepacked else OneDNNConv2d
    return copied


class ChannelsLast(torch.nn.Module):
    """``model`` in channels-last memory format, its input converted on the way in (PyTorch's advice for CPU)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def latencies_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median latency (ms) of each model on ``x`` (``torch.utils.benchmark``, see ``interleaved_medians_ms``): the
    models take turns in every round, so drift in the shared machine's speed hits them alike."""
    return interleaved_medians_ms({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--part", choices=["all", "accuracy", "speed"], default="all")
    parser.add_argument("--speed-worker", choices=["default", "keep"], help=argparse.SUPPRESS)
    parser.add_argument("--speed-threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_worker:
        print(json.dumps(speed_rows(args.speed_worker, args.speed_threads)))
        return
    if args.part in ("all", "accuracy"):
        accuracy_table(args)
    if args.part in ("all", "speed"):
        speed_table()


def accuracy_table(args: argparse.Namespace) -> None:
    """Part 1: test accuracy per WTA setting."""

    rows, cells = [], []
    conv: list[str] = []      # the default placement: the activations that follow a convolution
    settings = [("dense", None, None, []), ("WTA 25% conv channels", 0.25, None, conv),
                ("WTA 50% conv channels", 0.5, None, conv), ("WTA 75% conv channels", 0.75, None, conv),
                ("WTA 50% conv channels + FC neurons", 0.5, None, ["*"]),
                ("WTA 50% conv channels, 2 blocks", 0.5, 2, conv)]
    dense_acc = None
    for label, sparsity, blocks, layers in settings:
        accs = [accuracy(sparsity, blocks, layers, seed, args.epochs) for seed in range(args.seeds)]
        mean = statistics.mean(accs)
        dense_acc = mean if sparsity is None else dense_acc
        rows.append([label, mean, min(accs), max(accs), (mean - dense_acc) * 100])
        cells.append({"setting": label, "sparsity": sparsity, "blocks": blocks, "layers": layers,
                      "accuracies": accs})
        print(f"  {label}: {accs}", flush=True)
    publish("dasnet_accuracy", ["setting", "mean test acc", "min", "max", "points vs dense"], rows,
            {"dataset": "scikit-learn digits (8x8 upsampled to 32x32), 70/10/20 split", "model": "LeNet-5",
             "epochs": args.epochs, "cells": cells})


def speed_rows(allocator: str, threads: int) -> list[dict]:
    """Part 2 in this process: latencies of every net / WTA form / batch at ``threads`` threads, with the allocator
    mode applied first."""
    torch.set_num_threads(threads)
    if allocator == "keep":
        compresskit.keep_freed_memory()
    nets = {"VGG-11": lambda: vgg("vgg11"), "ResNet-20 (width 32)": lambda: resnet_cifar(20, width=32),
            "ResNet-20 (width 64)": lambda: resnet_cifar(20, width=64)}
    runs = []
    for net_name, ctor in nets.items():
        torch.manual_seed(0)
        dense = ctor().eval()
        dense_onednn = dense_on_onednn(dense)
        dense_folded = dense_on_onednn(fuse(copy.deepcopy(dense)))
        dense_folded_nhwc = ChannelsLast(fuse(copy.deepcopy(dense)))
        dense_folded_prepacked = dense_on_onednn(fuse(copy.deepcopy(dense)), prepacked=True)
        for blocks in (None, 2):
            wta = copy.deepcopy(dense)
            insert_wta(wta, 0.5, blocks=blocks)
            wta.eval()
            sparse = copy.deepcopy(wta)
            decisions = to_sparse_execution(sparse, (torch.randn(32, 3, 32, 32),), batch_sizes=(1, 32))
            compact_batches = sorted(set(b for batches in decisions.values() for b in batches))
            for batch in (1, 32):
                x = torch.randn(batch, 3, 32, 32)
                t = latencies_ms({"dense": dense, "dense_onednn": dense_onednn, "dense_folded": dense_folded,
                                  "dense_folded_nhwc": dense_folded_nhwc,
                                  "dense_folded_prepacked": dense_folded_prepacked, "masked": wta, "sparse": sparse},
                                 x, rounds=20 if batch == 1 else 5)
                with torch.no_grad():
                    err = float((sparse(x) - wta(x)).abs().max())
                best_dense = min(t["dense"], t["dense_onednn"], t["dense_folded"], t["dense_folded_nhwc"],
                                 t["dense_folded_prepacked"])
                runs.append({"allocator": allocator, "threads": threads, "net": net_name,
                             "wta": "per channel" if blocks is None else f"{blocks} blocks", "batch": batch,
                             "dense_ms": t["dense"], "dense_onednn_ms": t["dense_onednn"],
                             "dense_bn_folded_ms": t["dense_folded"],
                             "dense_bn_folded_channels_last_ms": t["dense_folded_nhwc"],
                             "dense_bn_folded_prepacked_ms": t["dense_folded_prepacked"], "wta_masked_ms": t["masked"],
                             "sparse_ms": t["sparse"], "compact_path_used": batch in compact_batches,
                             "prepacked_kernels_used": batch in prepacked_batch_sizes(sparse),
                             "native_kernels_used": batch in native_batch_sizes(sparse) or (
                                 blocks is None and batch in compact_batches and native.kernels() is not None),
                             "tuned_dense_used": batch in tuned_dense_batch_sizes(sparse),
                             "speedup_vs_dense": t["dense"] / t["sparse"],
                             "speedup_vs_best_dense": best_dense / t["sparse"], "max_abs_error": err,
                             "wrapped_layers": len(decisions),
                             "folded_batchnorms": folded_batchnorms(sparse)})
                print(f"  {runs[-1]}", file=sys.stderr, flush=True)
    return runs


def speed_table() -> None:
    """Part 2: inference latency, dense vs the sparse execution path, measured in the same run; once with glibc's
    default allocator and once with ``keep_freed_memory``, each in a fresh process (the setting is process wide)."""
    runs = []
    for allocator, threads in (("default", 1), ("default", 2), ("keep", 2)):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--speed-worker", allocator,
                              "--speed-threads", str(threads)], check=True, stdout=subprocess.PIPE, text=True)
        runs += json.loads(out.stdout.strip().splitlines()[-1])
    keys = ["allocator", "threads", "net", "wta", "batch", "dense_ms", "dense_onednn_ms", "dense_bn_folded_ms",
            "dense_bn_folded_channels_last_ms", "dense_bn_folded_prepacked_ms", "wta_masked_ms", "sparse_ms",
            "compact_path_used", "prepacked_kernels_used", "native_kernels_used", "tuned_dense_used",
            "speedup_vs_dense", "speedup_vs_best_dense"]
    publish("dasnet_speed", ["allocator", "threads", "net", "WTA", "batch", "dense ms", "dense oneDNN ms",
                             "dense BN-folded ms", "dense BN-folded NHWC ms", "dense BN-folded prepacked ms",
                             "WTA masked ms", "sparse path ms", "compact used", "prepacked", "native",
                             "tuned dense used", "dense / sparse", "best dense / sparse"],
            [[r[k] for k in keys] for r in runs],
            {"sparsity": 0.5, "input": "3x32x32", "threads": [1, 2],
             "onednn_private_ops": onednn.private_ops_enabled(), "onednn_probe": onednn.probe().reason or "ok",
             "timing": "torch.utils.benchmark.Timer: per model and round timeit(3) after 2 warm-up calls, models "
                       "interleaved; median over rounds (20 at batch 1, 5 at batch 32)", "runs": runs})


if __name__ == "__main__":
    main()
