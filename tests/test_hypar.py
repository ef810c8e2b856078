"""HyPar: the communication model against a simulator that really splits tensors, the DP against brute force,
layer graphs from traced models, and the planner report / CLI."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import compresskit
from compresskit.cli import main
from compresskit.models.lenet import LeNet5
from compresskit.plugins.hypar import (LayerSpec, exhaustive_plan, hierarchical_plan, joint_plan,
                                       layers_from_model, paper_network)
from compresskit.plugins.hypar.cost import plan_cost
from compresskit.plugins.hypar.search import baselines, one_split
from compresskit.plugins.hypar.simulate import TwoWorkerMLP, reference


def _mlp_layers(widths):
    return [LayerSpec(f"fc{i}", "fc", widths[i], widths[i + 1], widths[i] * widths[i + 1])
            for i in range(len(widths) - 1)]


@pytest.mark.parametrize("widths,batch", [([6, 8, 4, 10, 2], 4), ([12, 2, 16, 6], 8), ([4, 30, 30, 4], 2)])
def test_cost_model_equals_simulated_transfers(widths, batch):
    weights = [torch.randn(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]
    x, target = torch.randn(batch, widths[0]), torch.randn(batch, widths[-1])
    out_ref, grads_ref = reference(weights, x, target)
    sim = TwoWorkerMLP(weights, x, target)
    layers = _mlp_layers(widths)
    for choices in itertools.product(["dp", "mp"], repeat=len(weights)):
        result = sim.run(list(choices))
        # the split computation is the real one ...
        assert torch.allclose(result.output, out_ref, atol=1e-5)
        for got, want in zip(result.grads, grads_ref):
            assert torch.allclose(got, want, atol=1e-4)
        # ... and it moved exactly what the model says, term by term
        states = [0 if c == "dp" else 1 for c in choices]
        assert result.total == plan_cost(layers, states, batch, levels=1)
        intra = sum(2 * l.weight_elems for l, c in zip(layers, choices) if c == "dp")
        assert result.intra == intra


def test_one_split_dp_equals_brute_force():
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        layers = [LayerSpec(f"l{i}", "fc", int(torch.randint(1, 500, (1,), generator=gen)), 1,
                            int(torch.randint(1, 5000, (1,), generator=gen))) for i in range(n)]
        _, cost = one_split(layers, batch=32)
        brute = min(plan_cost(layers, list(s), 32, 1) for s in itertools.product((0, 1), repeat=n))
        assert cost == pytest.approx(brute)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_joint_search_equals_exhaustive_and_bounds_hierarchical(levels):
    gen = torch.Generator().manual_seed(levels)
    for trial in range(6):
        n = 3 if levels == 3 else 4
        layers = [LayerSpec(f"l{i}", "conv" if i < n // 2 else "fc",
                            int(torch.randint(1, 3000, (1,), generator=gen)), 1,
                            int(torch.randint(1, 300000, (1,), generator=gen))) for i in range(n)]
        best = exhaustive_plan(layers, 64, levels)
        joint = joint_plan(layers, 64, levels)
        hier = hierarchical_plan(layers, 64, levels)
        assert joint.elements == pytest.approx(best.elements)
        assert plan_cost(layers, joint.states, 64, levels) == pytest.approx(joint.elements)
        assert plan_cost(layers, hier.states, 64, levels) == pytest.approx(hier.elements)
        assert hier.elements >= joint.elements - 1e-6
        for base in baselines(layers, 64, levels).values():
            assert joint.elements <= base.elements + 1e-6


def test_hierarchical_levels_each_optimal_given_the_levels_above():
    layers = paper_network("lenet-c")
    plan = hierarchical_plan(layers, 128, 2)
    top = [s & 1 for s in plan.states]
    _, level0 = one_split(layers, 128)
    assert plan_cost(layers, top, 128, 1) == pytest.approx(level0)


def test_paper_networks_have_the_papers_layer_counts():
    counts = {name: len(paper_network(name)) for name in
              ["lenet", "lenet-c", "convnet", "alexnet", "vgg-a", "vgg-b", "vgg-c", "vgg-d", "vgg-e"]}
    assert counts == {"lenet": 3, "lenet-c": 4, "convnet": 5, "alexnet": 8, "vgg-a": 11, "vgg-b": 13,
                      "vgg-c": 16, "vgg-d": 16, "vgg-e": 19}
    vgg_e = paper_network("vgg-e")
    assert vgg_e[0].weight_elems == 64 * 3 * 9 + 64
    assert vgg_e[16].input_elems == 512 * 7 * 7 and vgg_e[16].weight_elems == 25088 * 4096 + 4096


def test_layers_from_traced_model_match_shapes():
    layers = layers_from_model(LeNet5(), (torch.randn(2, 1, 32, 32),))
    assert [l.kind for l in layers] == ["conv", "conv", "fc", "fc", "fc"]
    assert layers[0].input_elems == 32 * 32 and layers[0].output_elems == 6 * 28 * 28
    assert layers[1].input_elems == 6 * 14 * 14           # after pooling: the boundary tensor
    assert layers[2].input_elems == 16 * 5 * 5 and layers[2].weight_elems == 400 * 120 + 120


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:       # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return x

    with pytest.raises(compresskit.ConfigError, match="cannot trace Branchy with torch.fx"):
        layers_from_model(Branchy(), (torch.randn(2, 4),))


def test_non_power_of_two_is_a_clear_error():
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].accelerators: got 12, expected a power of two "
                                                       r"\(e.g. 8 or 16\)"):
        compresskit.validate_recipe({"stages": [{"plugin": "hypar", "network": "vgg-e", "accelerators": 12}]})


def test_plan_cli_writes_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compresskit", "plan", "--model", "alexnet", "--accelerators",
                           "16", "--batch", "128", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["layers"]) == 8 and plan["levels"] == 4
    assert all(len(r["choices"]) == 4 for r in plan["layers"])
    assert plan["total_elements"]["hypar"] <= min(v for k, v in plan["total_elements"].items() if k != "hypar")
    html = (tmp_path / "plan.html").read_text()
    assert "<img alt='communication per layer' src='data:image/png;base64," in html
    assert (tmp_path / "comm_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert "| conv1 | conv |" in (tmp_path / "plan.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "compresskit", "plan", "--model", "alexnet", "--accelerators", "6"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected a power of two" in bad.stderr


def test_plan_a_traced_model_from_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: vgg, args: {{width: 0.25}}}}\n"
                      f"stages: [{{plugin: hypar, accelerators: 4, batch: 32, input_shape: [3, 32, 32]}}]\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "compresskit", "plan", str(recipe)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["title"] == "VGG" and len(plan["layers"]) == 9


_NETS = """
from torch import nn


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def declared_cnn():
    model = small_cnn()
    model.input_shape = (1, 16, 16)
    return model
"""


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A module ``hypar_cli_nets`` with CNN factories on sys.path; the test runs in ``tmp_path``."""
    (tmp_path / "hypar_cli_nets.py").write_text(_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hypar_cli_nets", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("extra,expected", [
    ([], "error: --input-shape: needed to trace Sequential, which declares no input_shape: give one sample's "
         "shape without the batch dim, e.g. --input-shape 3,32,32"),
    (["--input-shape", "1,32,32"], "error: --input-shape: the sample input (per sample 1x32x32) does not fit "
                                   "Sequential at '4': mat1 and mat2 shapes cannot be multiplied"),
    (["--input-shape", "3,x"], "error: --input-shape: got '3,x', expected positive integers separated by commas"),
    (["--input-shape", "0,32,32"], "error: --input-shape: got '0,32,32', expected positive integers"),
    (["--input-shape", "3,,32"], "error: --input-shape: got '3,,32', expected positive integers"),
])
def test_plan_custom_model_input_shape_errors_are_one_line(nets, capsys, extra, expected):
    rc = main(["plan", "--model", "hypar_cli_nets:small_cnn", "--accelerators", "4", *extra])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(expected), err
    assert "Traceback" not in err and not any(nets.rglob("plan.json"))


@pytest.mark.parametrize("factory,extra", [("small_cnn", ["--input-shape", "1,16,16"]),
                                           ("small_cnn", ["--input-shape", " 1, 16 ,16"]),
                                           ("declared_cnn", [])])           # the model's own input_shape
def test_plan_custom_model_with_its_input_shape(nets, capsys, factory, extra):
    out = nets / "out"
    assert main(["plan", "--model", f"hypar_cli_nets:{factory}", "--accelerators", "4", "--batch", "8",
                 "--out", str(out), *extra]) == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert [l["layer"] for l in plan["layers"]] == ["0", "4"]
