"""Renderers of DASNet's results (docs/dasnet.md and the README's DASNet numbers)."""
from __future__ import annotations

from .core import load, measured_on, provenance, renderer, span


@renderer("dasnet-speed-summary")
def dasnet_speed_summary() -> str:
    """Per net and WTA form, the sparse path's speed against PyTorch's dense model and the best tuned dense one."""
    runs = load("dasnet_speed")["runs"]
    lines = ["| net | WTA | batch 1: vs dense | batch 1: vs best dense | batch 32: vs dense | batch 32: vs best dense |",
             "|---|---|---|---|---|---|"]
    for net in dict.fromkeys(r["net"] for r in runs):
        for form in dict.fromkeys(r["wta"] for r in runs):
            cells = []
            for batch in (1, 32):
                mine = [r for r in runs if r["net"] == net and r["wta"] == form and r["batch"] == batch]
                cells += [span([r["speedup_vs_dense"] for r in mine]),
                          span([r["speedup_vs_best_dense"] for r in mine])]
            lines.append(f"| {net} | {form} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\nEach cell spans the two allocator settings.\n\n" + provenance("dasnet_speed"))


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
    cells = [c for c in load("dasnet_speed")["runs"] if c["allocator"] == "default"]
    vgg = [c for c in cells if c["net"] == "VGG-11" and c["wta"] == "2 blocks"]
    best = {b: [c["speedup_vs_best_dense"] for c in vgg if c["batch"] == b] for b in (1, 32)}
    plain = {b: [c["speedup_vs_dense"] for c in vgg if c["batch"] == b] for b in (1, 32)}
    per_channel = [c["speedup_vs_best_dense"] for c in cells if c["wta"] == "per channel"]
    acc = {c["setting"]: c for c in load("dasnet_accuracy")["cells"]}
    dense = sum(acc["dense"]["accuracies"]) / len(acc["dense"]["accuracies"])
    blocks = next(c for name, c in acc.items() if "2 blocks" in name)
    drop = (sum(blocks["accuracies"]) / len(blocks["accuracies"]) - dense) * 100
    return (f"On a VGG-11 at 50% 2-block WTA sparsity, CPU inference runs at {span(best[1])} / {span(best[32])} "
            f"the speed of the tuned dense model (BatchNorm folded, prepacked oneDNN kernels, best memory format; "
            f"batch 1 / 32) and {span(plain[1])} / {span(plain[32])} that of PyTorch's plain dense model, at "
            f"{drop:+.2f} accuracy points (LeNet-5 on digits, 3 seeds). The paper's per-channel WTA gets no speed "
            f"({span(per_channel)} of the tuned dense model; {load('dasnet_speed')['environment']['threads']} "
            f"threads, {measured_on('dasnet_speed', 'dasnet_accuracy')})")
