"""Training logs (issue 16): the CSV read back row by row against the run's own numbers, a resumed run's CSV equal
to an uninterrupted one's, TensorBoard events, Python logging and run.log, the report's plots in report.html."""
from __future__ import annotations

import csv
import importlib.util
import logging
import math

import pytest
import yaml

from compresskit.api import run
from compresskit.errors import ConfigError
from compresskit.logs import LOG_NAME, read_csv_log
from compresskit.recipe import validate_recipe

TINY = {
    "model": {"name": "dlrm", "args": {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [8]}},
    "data": {"name": "synthetic-ctr", "args": {"num_samples": 1200, "cardinality_scale": 0.0002}},
    "train": {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1, "checkpoint_every": 3,
              "optimizer": {"name": "adagrad", "lr": 0.05}},
    "stages": [{"plugin": "fiited", "target_memory_ratio": 0.4, "chunk_size": 4, "interval": 2,
                "start_step": 2, "end_step": 10}],
    "logging": {"every": 2},
}



def recipe(**changes):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    for path, value in changes.items():
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def apply(raw, out, resume=False):
    return run(validate_recipe(raw), out_dir=str(out), resume=resume, raw=raw)


def test_csv_rows_are_the_runs_numbers(tmp_path):
    result = apply(recipe(), tmp_path)
    with open(tmp_path / LOG_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0])
    assert columns[:7] == ["step", "epoch", "loss", "smoothed_loss", "lr", "steps_per_s", "elapsed_s"]
    assert columns[7:] == ["fiited/kept_ratio", "fiited/memory_ratio", "fiited/payload_bytes", "fiited/index_bytes"]
    steps = [int(r["step"]) for r in rows]
    total = result.report["training"]["steps"]
    assert steps == list(range(2, total + 1, 2)) + ([total] if total % 2 else [])
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert all(float(r["lr"]) == 0.05 for r in rows)
    assert all(float(r["steps_per_s"]) > 0 for r in rows[1:]) and rows[0]["steps_per_s"] == ""
    stage = result.report["stages"][0]
    last = rows[-1]
    # the last row is the trained model's bytes, as the report measures them from the tensors
    assert int(last["fiited/payload_bytes"]) == stage["payload_bytes"]
    assert int(last["fiited/index_bytes"]) == stage["index_bytes"]
    assert float(last["fiited/kept_ratio"]) == pytest.approx(stage["payload_ratio"])
    assert float(last["fiited/memory_ratio"]) == pytest.approx(stage["memory_ratio"])
    kept = [float(r["fiited/kept_ratio"]) for r in rows]
    assert kept[0] > 0.9 and kept[-1] < 0.4 and kept == sorted(kept, reverse=True)   # pruned during training
    assert float(last["smoothed_loss"]) == pytest.approx(result.report["training"]["train_loss"])


def test_report_has_the_plots(tmp_path):
    apply(recipe(), tmp_path)
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["fiited_bytes.png", "fiited_kept_per_row.png", "loss.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Embedding tables" in page
    md = (tmp_path / "report.md").read_text()
    assert "![Training loss](plots/loss.png)" in md


def test_resumed_log_equals_the_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole"
    apply(recipe(**{"train.checkpoint_every": 3}), whole)
    parts = tmp_path / "parts"
    apply(recipe(**{"train.max_steps": 6}), parts)
    # the interrupted run logged past its last checkpoint (step 6) before it died: those rows must go
    with open(parts / LOG_NAME, "a") as f:
        f.write("8,1,9.0,9.0,0.05,1.0,1.0,1.0,1.0,1,1\n")
    apply(recipe(), parts, resume=True)
    columns, a = read_csv_log(str(whole / LOG_NAME))
    _, b = read_csv_log(str(parts / LOG_NAME))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in columns:
            if key not in ("steps_per_s", "elapsed_s"):
                assert ra[key] == rb[key] or (math.isnan(ra[key]) and math.isnan(rb[key])), (key, ra, rb)


def test_switches(tmp_path):
    apply(recipe(**{"logging.csv": False, "logging.plots": False, "logging.tensorboard": "never"}), tmp_path)
    assert not (tmp_path / LOG_NAME).exists() and not (tmp_path / "plots").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert "data:image/png" not in (tmp_path / "report.html").read_text()


def test_python_logging_and_run_log(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="compresskit"):
        apply(recipe(**{"logging.level": "debug"}), tmp_path)
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert any(name == "compresskit.train" and text.startswith("training ") for name, text in messages)
    assert any(name == "compresskit.train" and text.startswith("finished at step") for name, text in messages)
    text = (tmp_path / "run.log").read_text()
    assert "compresskit.train: training " in text and "DEBUG compresskit.train: checkpoint at step 3" in text
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("compresskit").handlers)


def test_console_under_the_cli(tmp_path, capsys):
    from compresskit.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(**{"train.max_steps": 2})))
    assert main(["apply", str(path), "--out", str(tmp_path / "a")]) == 0
    assert "INFO" not in capsys.readouterr().err               # default: warnings only, the bar shows progress
    assert main(["apply", str(path), "--out", str(tmp_path / "b"), "--set", "logging.console=info"]) == 0
    err = capsys.readouterr().err
    assert "INFO compresskit.train: training 2 steps" in err and err.count("finished at step 2") == 1
    root = logging.getLogger("compresskit")
    assert root.propagate and not root.handlers                # the CLI's console handler is gone after the run


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    apply(recipe(**{"logging.tensorboard": "always"}), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "fiited/payload_bytes", "fiited/kept_ratio"} <= set(tags)
    _, rows = read_csv_log(str(tmp_path / LOG_NAME))
    assert [e.step for e in events.Scalars("train/loss")] == [int(r["step"]) for r in rows]
    assert [e.value for e in events.Scalars("fiited/payload_bytes")] == [r["fiited/payload_bytes"] for r in rows]


def test_tensorboard_always_without_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.tensorboard: got 'always', but the tensorboard package"):
        validate_recipe(recipe(**{"logging.tensorboard": "always"}))
