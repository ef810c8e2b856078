"""Plan a model with HyPar and run one training step of the plan on 2 (or 4) local gloo processes; check it against
the one-process step and print what was exchanged.

    python examples/hypar_parallelize.py [--processes 4]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from compresskit.distributed.local import run_local
from compresskit.plugins.hypar import HyparConfig, layers_from_model, parallelize, plan_layers, train_step

BATCH = 32


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 256, generator=gen), torch.randint(0, 16, (BATCH,), generator=gen)


def one_step(rank: int, world: int, plan) -> dict:
    """Runs on every process: the model laid out by the plan, one SGD step."""
    parallel = parallelize(make_model(), plan)
    x, y = batch()
    loss = train_step(parallel, x, y, nn.functional.cross_entropy,
                      torch.optim.SGD(parallel.parameters(), lr=0.1))
    first_layer = parallel.full(0, "weight")          # gathered through DTensor
    return {"loss": loss.item(), "w0": first_layer, "received": parallel.received().terms.sum()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=2, choices=[2, 4])
    args = parser.parse_args()
    x, y = batch()
    layers = layers_from_model(make_model(), (x,))
    plan = plan_layers(layers, HyparConfig(accelerators=args.processes, batch=BATCH), "example MLP")
    print("plan:", ", ".join(f"{l.layer}={'/'.join(l.choices)}" for l in plan.layers),
          f"(model: {plan.total_elements['hypar']:.0f} elements per step; all data parallel "
          f"{plan.total_elements['all data parallel']:.0f})")
    got = run_local(one_step, args.processes, (plan,))[0]

    model = make_model()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    print(f"loss {got['loss']:.6f} (one process: {loss.item():.6f}); first kernel after the step differs by "
          f"{(got['w0'] - model[0].weight).abs().max().item():.1e}; {got['received']:.0f} elements exchanged")


if __name__ == "__main__":
    main()
