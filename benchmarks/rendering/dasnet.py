"""Renderers of DASNet's results (docs/dasnet.md and the README's DASNet numbers)."""
from __future__ import annotations

from .core import load, measured_on, provenance, renderer, span


def _speed_cell(runs: list[dict], net: str, form: str, batch: int, threads: int, key: str) -> str:
    """One setting's ratio (``key``) at ``threads`` threads: the default allocator's, spanning the keep allocator's
    where that setting also ran it."""
    return span([r[key] for r in runs if r["net"] == net and r["wta"] == form and r["batch"] == batch
                 and r.get("threads", 2) == threads])


@renderer("dasnet-speed-summary")
def dasnet_speed_summary() -> str:
    """Per net and WTA form, the sparse path's speed against the best tuned dense model (and PyTorch's dense
    model), at batch 1 and 32, 1 and 2 threads."""
    runs = load("dasnet_speed")["runs"]
    cells = [(b, t) for b in (1, 32) for t in (1, 2)]
    lines = ["| net | WTA | " + " | ".join(f"batch {b}, {t} thread{'s' if t > 1 else ''}" for b, t in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for net in dict.fromkeys(r["net"] for r in runs):
        for form in dict.fromkeys(r["wta"] for r in runs):
            lines.append(f"| {net} | {form} | " + " | ".join(
                f"{_speed_cell(runs, net, form, b, t, 'speedup_vs_best_dense')} "
                f"({_speed_cell(runs, net, form, b, t, 'speedup_vs_dense')})" for b, t in cells) + " |")
    return ("\n".join(lines) + "\n\nEach cell: against the best tuned dense model (in brackets: against PyTorch's "
            "dense model). At 2 threads a cell spans the two allocator settings.\n\n" + provenance("dasnet_speed"))


def _accuracy_points() -> dict[str, tuple[float, list[float]]]:
    """DASNet accuracy run: per setting, (mean points against dense, per-seed accuracies)."""
    cells = {c["setting"]: c["accuracies"] for c in load("dasnet_accuracy")["cells"]}
    dense = sum(cells["dense"]) / len(cells["dense"])
    return {name: ((sum(a) / len(a) - dense) * 100, a) for name, a in cells.items()}


@renderer("dasnet-accuracy-findings", block=False)
def dasnet_accuracy_findings() -> str:
    pts = _accuracy_points()
    channel, blocks = pts["WTA 50% conv channels"][0], pts["WTA 50% conv channels, 2 blocks"][0]
    fc, fc_seeds = pts["WTA 50% conv channels + FC neurons"]
    dense_seeds = pts["dense"][1]
    worst = (min(fc_seeds) - sum(dense_seeds) / len(dense_seeds)) * 100
    return (f"At 50% channel sparsity the change is {channel:+.2f} points per channel and {blocks:+.2f} points with 2 "
            f"blocks. Also making LeNet's small fully connected layers (120 and 84 neurons) 50% sparse gives "
            f"{fc:+.2f} points (its worst seed {worst:+.1f}). Seed to seed, the dense model alone moves by "
            f"{(max(dense_seeds) - min(dense_seeds)) * 100:.1f} points on this 360-image test split, so differences "
            f"below about a point are within noise")


@renderer("dasnet-placement-findings", block=False)
def dasnet_placement_findings() -> str:
    pts = _accuracy_points()
    return (f"our own LeNet-5 / digits table below shows the same direction "
            f"({pts['WTA 50% conv channels + FC neurons'][0]:+.2f} against {pts['WTA 50% conv channels'][0]:+.2f} "
            f"points)")


@renderer("readme-dasnet", block=False)
def readme_dasnet() -> str:
    runs = [c for c in load("dasnet_speed")["runs"] if c["allocator"] == "default"]

    def best(form: str, net: str | None = None, batch: int | None = None) -> str:
        return span([c["speedup_vs_best_dense"] for c in runs if c["wta"] == form
                     and (net is None or c["net"] == net) and (batch is None or c["batch"] == batch)])

    acc = {c["setting"]: c for c in load("dasnet_accuracy")["cells"]}
    dense = sum(acc["dense"]["accuracies"]) / len(acc["dense"]["accuracies"])

    def points(name: str) -> float:
        return (sum(acc[name]["accuracies"]) / len(acc[name]["accuracies"]) - dense) * 100

    return (f"At 50% WTA sparsity, CPU inference on VGG-11 runs at {best('2 blocks', 'VGG-11', 1)} / "
            f"{best('2 blocks', 'VGG-11', 32)} the speed of the best tuned dense model (BatchNorm folded, prepacked "
            f"oneDNN kernels, best memory format; batch 1 / 32, 1 and 2 threads) with 2-block WTA, and at "
            f"{best('per channel', 'VGG-11', 1)} / {best('per channel', 'VGG-11', 32)} with the paper's "
            f"per-channel WTA; over VGG-11 and ResNet-20 at widths 32 and 64, 2-block WTA spans "
            f"{best('2 blocks')} and per-channel {best('per channel')}. Accuracy at 50%: "
            f"{points('WTA 50% conv channels'):+.2f} points per channel, {points('WTA 50% conv channels, 2 blocks'):+.2f}"
            f" with 2 blocks (LeNet-5 on digits, 3 seeds; {measured_on('dasnet_speed', 'dasnet_accuracy')})")
