"""DASNet ``quantize: int8`` (``plugins/dasnet/quantize.py``): torchao where it imports, torch.ao after a logged
warning where it does not. Both keep LeNet-5's logits close to the float model's, the torchao path really holds
torchao int8 weights, and Linear layers the sparse path runs stay float so the compact path still runs.

Measured on LeNet-5 trained 5 epochs on digits (4 seeds; 539 test + validation images, max |float logit| about 16):
the largest logit difference was 0.6% to 1.2% of the largest |logit| with either backend, argmax agreement 0.998
to 1.0. The bounds below are 3% and 0.98."""
from __future__ import annotations

import copy
import importlib.util
import logging
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from compresskit.data.images import load_digits
from compresskit.models.lenet import LeNet5
from compresskit.plugin import RunContext
from compresskit.plugins.dasnet import ChannelSparse, DasnetConfig, DasnetPlugin, SparseLinear, WTADropout
from compresskit.plugins.dasnet.quantize import TORCH_AO, TORCHAO, linear_targets, quantize_int8
from compresskit.schema import build

HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao not installed (pip install torchao==0.18.0)")
MAX_REL_DIFF = 0.03      # max |int8 - float logit| / max |float logit|; measured 0.006 to 0.012
MIN_AGREEMENT = 0.98     # argmax agreement; measured 0.998 to 1.0


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LeNet-5 trained 5 epochs on digits (seeded, ~2 s), its eval inputs (test + validation) and float logits."""
    torch.manual_seed(0)
    data = load_digits(image_size=32)
    x_train, y_train = data.train.tensors
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=0.002)
    for _ in range(5):
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    x = torch.cat([data.test.tensors[0], data.val.tensors[0]])
    with torch.no_grad():
        return model, x, model(x)


@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torchao`` fail as it does where torchao is not installed."""
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)


def _assert_close(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(x)
    rel = float((out - ref).abs().max() / ref.abs().max())
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert rel <= MAX_REL_DIFF and agreement >= MIN_AGREEMENT, (rel, agreement)


@needs_torchao
def test_torchao_int8_close_to_float(trained):
    model, x, ref = trained
    q, backend = quantize_int8(copy.deepcopy(model), linear_targets(model))
    assert backend == TORCHAO
    from torchao.utils import TorchAOBaseTensor     # imported by quantize_int8 already (its import logs are held back)

    for name in ["classifier.1", "classifier.3", "classifier.5"]:
        layer = q.get_submodule(name)
        assert type(layer) is nn.Linear and isinstance(layer.weight, TorchAOBaseTensor)
        assert layer.weight.qdata.dtype == torch.int8
    assert not isinstance(q.features[0].weight, TorchAOBaseTensor)       # convolutions are left alone
    _assert_close(q, x, ref)
    restored = pickle.loads(pickle.dumps(q))                               # torchao's per-layer extra_repr dropped
    with torch.no_grad():
        assert torch.equal(restored(x[:8]), q(x[:8]))


@needs_torchao
def test_torchao_state_dict_loads_in_a_fresh_process(trained, tmp_path):
    """A model.pt holding torchao weights loads with weights_only=True where torchao is not imported yet
    (integrity.load imports it when the unpickler names it)."""
    from compresskit import integrity

    q, _ = quantize_int8(copy.deepcopy(trained[0]), linear_targets(trained[0]))
    path = tmp_path / "model.pt"
    integrity.save(path, q.state_dict())
    code = ("import sys; from compresskit import integrity; assert 'torchao' not in sys.modules; "
            f"sd = integrity.load({str(path)!r}); print(sorted({{type(v).__name__ for v in sd.values()}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Int8Tensor" in out.stdout


def test_fallback_warns_and_close_to_float(trained, no_torchao, caplog):
    model, x, ref = trained
    with caplog.at_level(logging.WARNING, logger="compresskit.plugins.dasnet.quantize"):
        q, backend = quantize_int8(copy.deepcopy(model), linear_targets(model))
    assert backend == TORCH_AO == "torch.ao (torchao not installed)"
    assert any("torchao not installed" in r.getMessage() and "quantize_dynamic" in r.getMessage()
               for r in caplog.records)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    assert sum(isinstance(m, DynamicQuantizedLinear) for m in q.modules()) == 3
    _assert_close(q, x, ref)


@pytest.mark.parametrize("backend", [pytest.param(TORCHAO, marks=needs_torchao), TORCH_AO])
def test_plugin_keeps_sparse_path_and_reports_backend(trained, backend, request, caplog):
    """WTA after every ReLU and sparse_execution: always: the classifier's last two Linears run on the compact
    activation (SparseLinear) and stay float; only classifier.1 is quantized. The compact path still runs."""
    if backend == TORCH_AO:
        request.getfixturevalue("no_torchao")
    model, x, _ = trained
    model = copy.deepcopy(model)
    plugin = DasnetPlugin(build(DasnetConfig, {"sparsity": 0.5, "layers": ["*"], "quantize": "int8",
                                               "sparse_execution": "always", "tune_batches": [1, 64]}, "stages[0]"))
    plugin.apply(model, RunContext())
    model.eval()
    x = x[:512]
    with torch.no_grad():
        ref = model(x)                                       # float, masked dense WTA
    with caplog.at_level(logging.WARNING, logger="compresskit.plugins.dasnet.quantize"):
        model = plugin.finalize(model, RunContext(sample_input=(x[:4],)))
    report = plugin.report(RunContext())
    assert report["int8_backend"] == backend and report["int8_linear_layers"] == 1
    assert plugin.quantized == ["classifier.1"]
    assert any("falling back" in r.getMessage() for r in caplog.records) == (backend == TORCH_AO)
    twins = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(twins) == 2 and all(type(t.layer.weight) is nn.Parameter for t in twins)
    assert all(64 in m.compact_batches for m in model.modules() if isinstance(m, WTADropout))
    compact_inputs: list[bool] = []
    twins[0].register_forward_pre_hook(lambda mod, args: compact_inputs.append(isinstance(args[0], ChannelSparse)))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])

    out = run()
    assert compact_inputs and all(compact_inputs)           # the twin got WTA's compact form, and ran it
    for m in model.modules():                                # the same quantized model on the masked dense path
        if isinstance(m, WTADropout):
            m.compact_batches = set()
    compact_inputs.clear()
    masked = run()
    assert compact_inputs and not any(compact_inputs)
    # the compact convolutions (native, per-channel WTA) sum in another order than the dense ones: an activation
    # a float rounding apart can round to the next int8 step in the dynamically quantized layer after them, which
    # moves a logit by about 1e-3 (measured 1.3e-3 with torch.ao; 3e-6 with torchao)
    assert torch.allclose(out, masked, atol=5e-3, rtol=1e-4)
    # WTA now ranks units computed from int8 layers, so a few near-tied units change winner: the largest logit
    # difference is larger than without WTA (measured 4.4% torch.ao, 4.8% torchao of max |logit| 8.5; the mean
    # difference 0.7% of the mean |logit|)
    rel = float((out - ref).abs().max() / ref.abs().max())
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert rel <= 0.1 and agreement >= MIN_AGREEMENT, (rel, agreement)
