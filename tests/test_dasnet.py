"""DASNet: WTA keeps exactly the top-k channels per sample, adds no parameters, inserts by pattern with clear
errors (by default after the conv activations only), the sparse execution path equals the dense masked computation,
``sparse_execution: always|never`` builds the same model every run and the report records the choice, bad numbers
are refused by the validator, and it composes with pruning + int8."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import compresskit
from compresskit.models.lenet import LeNet5
from compresskit.models.resnet_cifar import resnet_cifar
from compresskit.models.vgg import vgg
from compresskit.cli import main
from compresskit.plugin import RunContext
from compresskit.plugins.dasnet import convert, onednn
from compresskit.plugins.dasnet import native as dasnet_native
from compresskit.plugins.dasnet import (
    ChannelSparse,
    DasnetConfig,
    DasnetPlugin,
    PassFolded,
    SparseConv2d,
    SparseLinear,
    SparsePool,
    WTADropout,
    compact_wta,
    conv_activation_names,
    insert_wta,
    prepacked_batch_sizes,
    to_sparse_execution,
    wta_mask,
)
from compresskit.plugins.dasnet.wta import activation_names
from compresskit.schema import build


def test_wta_keeps_top_k_channels_per_sample():
    x = torch.randn(5, 8, 4, 4)
    out = WTADropout(0.75)(x)
    kept = out.abs().flatten(2).amax(2) > 0
    assert kept.sum(1).tolist() == [2] * 5
    score = x.abs().flatten(2).mean(2)
    for b in range(5):
        winners = set(torch.topk(score[b], 2).indices.tolist())
        assert set(torch.nonzero(kept[b]).flatten().tolist()) == winners
        assert torch.equal(out[b, list(winners)], x[b, list(winners)])


def test_wta_neurons_blocks_and_modes():
    x = torch.randn(3, 10)
    assert ((WTADropout(0.5)(x) != 0).sum(1) == 5).all()
    y = WTADropout(0.5, blocks=2)(torch.randn(4, 6, 3, 3))
    alive = (y.abs().flatten(2).amax(2) > 0).view(4, 2, 3)
    assert (alive.all(2) | ~alive.any(2)).all() and (alive.any(2).sum(1) == 1).all()   # whole blocks win
    train_only = WTADropout(0.5, active_in="train").eval()
    assert torch.equal(train_only(x), x)


def test_insert_wta_by_pattern_adds_no_parameters():
    model = vgg("vgg11", width=0.25)
    before = sum(p.numel() for p in model.parameters())
    placed = insert_wta(model, 0.5, overrides={"features.2": 0.25}, layers=["features.*"])
    assert len(placed) == 8 and placed["features.2"] == 0.25
    assert sum(p.numel() for p in model.parameters()) == before
    with pytest.raises(ValueError, match="'features.99' matches no ReLU module; available: features.2, features.6"):
        insert_wta(vgg("vgg11", width=0.25), 0.5, layers=["features.99"])


def test_missing_layer_is_a_recipe_error():
    recipe = {"model": {"name": "lenet5"}, "data": {"name": "digits"},
              "stages": [{"plugin": "dasnet", "layers": ["classifier.9"]}]}
    rec = compresskit.validate_recipe(recipe, require_model=True)
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].layers: 'classifier.9' matches no ReLU"):
        compresskit.run(rec)


@pytest.mark.parametrize("blocks", [None, 2, 4])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("prepack", [False, True])
def test_sparse_execution_equals_dense_masked(blocks, batch, prepack):
    for model in (vgg("vgg11", width=0.25), resnet_cifar(20, width=8), LeNet5(in_channels=3)):
        insert_wta(model, 0.5, blocks=blocks)
        model.eval()
        sparse = copy.deepcopy(model)
        converted = to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(batch,), force=True,
                                        prepack=prepack)
        assert converted
        convs = [m for m in sparse.modules() if isinstance(m, SparseConv2d) and not m.dense_input]
        stems = [m for m in sparse.modules() if isinstance(m, SparseConv2d) and m.dense_input]
        assert stems and all(m.tuned_dense_batches == {batch} and not m.prepacked_batches for m in stems)
        packs = prepack and onednn.prepack_available()      # the shim's public fallback cannot prepack
        assert all(m.prepacked_batches == ({batch} if packs else set()) for m in convs)
        widths = []                                  # input channels each wrapped conv really computes on
        for m in convs:
            m.register_forward_pre_hook(lambda mod, args: widths.append(
                (args[0].shape[1], [p.data.shape[1] for p in args[0].parts],
                 any(p.key is not None for p in args[0].parts))))
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            out = sparse(x)
            assert isinstance(out, torch.Tensor)
            assert torch.allclose(out, model(x), atol=1e-5, rtol=1e-5)
        assert widths and all(k * 2 == c for c, ks, _ in widths for k in ks)    # half of the channels skipped
        prepacked = sum(m.prepacked_kernels() for m in convs)
        assert prepacked == sum(k.is_mkldnn for m in convs for k in m._cache.values())
        cached_slices = any(keyed for _, _, keyed in widths)          # block WTA; per channel gathers per call
        assert bool(prepacked) == (packs and cached_slices)
        if not isinstance(model, LeNet5):
            assert any(isinstance(m, SparsePool) for m in sparse.modules())


def _random_batchnorm_statistics(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


class ConvFeedsTwo(nn.Module):
    """The second conv's output feeds its BatchNorm and also the output: folding that BatchNorm would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(h)) + h


class Untraceable(ConvFeedsTwo):
    """Data-dependent control flow: torch.fx cannot trace it, so nothing may be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(h) if float(h.detach().sum()) > 0 else -h


def test_batchnorm_folding_is_exact_and_tracks_changes():
    torch.manual_seed(0)
    # every BatchNorm of ResNet-20 and VGG-11 folds, the stem's too (its conv runs as the tuned dense layer);
    # ConvFeedsTwo folds only its stem's chain (its second conv's output also feeds the output)
    cases = [(resnet_cifar(20, width=8), 21, 10), (vgg("vgg11", width=0.25), 8, 8), (ConvFeedsTwo(), 1, 1),
             (Untraceable(), 0, 0)]
    for model, folded_bns, fused_relus in cases:
        _random_batchnorm_statistics(model)
        insert_wta(model, 0.5, blocks=2)
        model.eval()
        sparse = copy.deepcopy(model)
        to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), force=True)
        passed = [m.layer for m in sparse.modules() if isinstance(m, PassFolded)]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in passed) == folded_bns
        assert sum(isinstance(m, nn.ReLU) for m in passed) == fused_relus
        assert sum(isinstance(m, SparseConv2d) and m.fused_relu for m in sparse.modules()) == fused_relus
        for batch in (1, 7):
            x = torch.randn(batch, 3, 32, 32)
            with torch.no_grad():
                assert torch.allclose(sparse(x), model(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(5, 3, 32, 32)
        for m in (model, sparse):                     # the BatchNorm changes after conversion (fine-tuning)
            for bn in [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)][-3:]:
                bn.running_var.mul_(3.0)
                bn.bias.data.add_(0.25)
        with torch.no_grad():
            assert torch.allclose(sparse(x), model(x), atol=1e-5, rtol=1e-5)
            assert torch.allclose(sparse(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)    # prepacked kernels too
        restored = pickle.loads(pickle.dumps(sparse))  # a converted model pickles (torch.save) and still folds
        with torch.no_grad():
            assert torch.allclose(restored(x), model(x), atol=1e-5, rtol=1e-5)
            assert torch.allclose(restored(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)
        model.train()
        sparse.train()                                # training: BatchNorms compute on batch statistics as before
        assert torch.allclose(sparse(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compact_form_falls_back_to_dense_for_other_ops(layout):
    x = torch.relu(torch.randn(5, 8, 4, 4)).contiguous(memory_format=layout)    # channels-last: prepacked convs
    for blocks in (None, 2, 4):
        compact = compact_wta(x, 0.5, blocks, nonnegative=True)
        dense = x * wta_mask(x, 0.5, blocks)
        assert isinstance(compact, ChannelSparse) and compact.shape == x.shape
        assert torch.equal(compact.dense(), dense)
        assert torch.equal(torch.flatten(compact, 1), dense.flatten(1))           # torch functions densify
        assert torch.equal(compact.reshape(5, -1), dense.reshape(5, -1))          # tensor methods too
        if layout == torch.contiguous_format:                  # (a channels-last tensor has no such view)
            assert torch.equal(compact.view(5, -1), dense.view(5, -1))
        if blocks == 2:                                        # the parts hold their samples' kept channels
            for p in compact.parts:
                rows = torch.arange(5) if p.rows is None else p.rows
                assert torch.equal(p.data, x[rows][:, p.channels])
        shortcut = torch.randn_like(x)
        before = shortcut.clone()
        assert torch.allclose(shortcut + compact, shortcut + dense)               # residual add scatters
        assert torch.allclose(compact + shortcut, shortcut + dense)
        assert torch.equal(shortcut, before)                                      # ... into a copy


def test_prepacked_path_returns_feature_maps_in_the_input_layout():
    torch.manual_seed(0)
    net = resnet_cifar(20, width=8)
    trunk = nn.Sequential(net.stem, net.layers)               # the output is a feature map, not logits
    _random_batchnorm_statistics(trunk)
    insert_wta(trunk, 0.5, blocks=2)
    trunk.eval()
    sparse = copy.deepcopy(trunk)
    to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 3), force=True)
    assert prepacked_batch_sizes(sparse) == ([1, 3] if onednn.prepack_available() else [])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            out = sparse(x)                                      # computed channels-last inside
            assert out.is_contiguous() and torch.allclose(out, trunk(x), atol=1e-5, rtol=1e-5)
            out = sparse(x.contiguous(memory_format=torch.channels_last))
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(out, trunk(x), atol=1e-5, rtol=1e-5)


def test_wta_to_dense_keeps_the_mode_and_drops_the_compact_output():
    for active_in in ("both", "train", "eval"):
        wta = WTADropout(0.5, active_in, blocks=2)
        wta.compact_batches = {1, 4}
        for training in (True, False):
            dense = wta.train(training).to_dense()
            assert dense.training == training and not dense.compact_batches and dense.active_in == active_in
            x = torch.rand(4, 8, 3, 3)
            with torch.no_grad():
                expected = x * wta_mask(x, 0.5, 2, False) if (active_in == "both" or
                                                              (active_in == "train") == training) else x
                assert torch.equal(dense(x), expected)


def test_compact_only_in_inference_without_autograd():
    wta = WTADropout(0.5, blocks=2)
    wta.compact_always = True
    x = torch.randn(3, 4, 2, 2)
    assert isinstance(wta(x), torch.Tensor)                       # training mode: masked
    wta.eval()
    assert isinstance(wta(x), torch.Tensor)                       # autograd on: masked
    with torch.no_grad():
        assert isinstance(wta(x), ChannelSparse)


def test_tuned_conversion_records_its_choice():
    for blocks in (None, 2):
        model = vgg("vgg11", width=0.5) if blocks else LeNet5(in_channels=3)
        insert_wta(model, 0.5, blocks=blocks)
        before = [type(m) for m in model.modules()]
        decisions = to_sparse_execution(model, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 8))
        wta = [m for m in model.modules() if isinstance(m, WTADropout)]
        if decisions:                                            # a measured win: layers wrapped, choice recorded
            chosen = set(next(iter(decisions.values())))
            tuned = set(convert.tuned_dense_batch_sizes(model))
            assert (chosen or tuned) and chosen | tuned <= {1, 8} and not chosen & tuned
            assert all(m.compact_batches == chosen and not m.compact_always for m in wta)
            assert any(isinstance(m, SparseConv2d) for m in model.modules())
            assert set(prepacked_batch_sizes(model)) <= chosen     # prepacked slices only where compact won
            if blocks is None:                                   # per-channel kernels are gathered, never packed
                assert not prepacked_batch_sizes(model)
        else:                                                    # none: the model is left as it was
            assert [type(m) for m in model.modules()] == before
            assert all(not m.compact_batches and not m.compact_always for m in wta)
            assert not model._forward_hooks
        with torch.no_grad():
            assert model(torch.randn(8, 3, 32, 32)).shape == (8, 10)


def test_recipe_composes_wta_pruning_and_int8(tmp_path):
    recipe = {"model": {"name": "lenet5"}, "data": {"name": "digits"},
              "train": {"epochs": 3, "batch_size": 64, "progress": False, "optimizer": {"name": "adam", "lr": 0.002}},
              "stages": [{"plugin": "dasnet", "sparsity": 0.5, "weight_pruning": 0.5, "quantize": "int8"}]}
    rec = compresskit.validate_recipe(recipe, require_model=True)
    result = compresskit.run(rec, out_dir=str(tmp_path))
    stage = result.report["stages"][0]
    assert stage["wta_layers"] == 2 and stage["int8_linear_layers"] == 3      # default: the conv activations
    assert stage["weight_zero_fraction"] == pytest.approx(0.5, abs=0.01)
    torchao = __import__("importlib").util.find_spec("torchao") is not None     # torchao where installed
    assert stage["int8_backend"] == ("torchao" if torchao else "torch.ao (torchao not installed)")
    state = torch.load(tmp_path / "model.pt", weights_only=True)   # after quantize_int8 imported torchao (if any)
    if torchao:
        from torchao.utils import TorchAOBaseTensor

        quantized = [m for m in result.model.modules() if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)]
        assert sum(isinstance(v, TorchAOBaseTensor) for v in state.values()) == 3
    else:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        quantized = [m for m in result.model.modules() if isinstance(m, DynamicQuantizedLinear)]
        assert any("_packed_params" in k for k in state)
    assert len(quantized) == 3
    final = result.report["training"]["final_test"]["accuracy"]
    assert final > 0.5


@pytest.mark.skipif(not __import__("importlib").util.find_spec("torchvision"), reason="torchvision not installed")
def test_torchvision_model_when_importable():
    try:
        import torchvision.models as tvm
    except Exception as e:  # the registry's torchvision may not import with this torch build
        pytest.skip(f"torchvision does not import here: {e}")
    model = tvm.resnet18(num_classes=10)
    placed = insert_wta(model, 0.5)
    assert placed
    model.eval()
    sparse = copy.deepcopy(model)
    to_sparse_execution(sparse, (torch.randn(2, 3, 64, 64),), force=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(sparse(x), model(x), atol=1e-4, rtol=1e-4)


def test_default_placement_is_the_conv_activations():
    def placed(model: nn.Module, **fields) -> list[str]:
        plugin = DasnetPlugin(build(DasnetConfig, fields, "stages[0]"))
        plugin.path = "stages[0]"
        plugin.apply(model, RunContext())
        return list(plugin.placed)

    assert placed(LeNet5()) == ["features.1", "features.4"]               # not the classifier head's ReLUs
    assert placed(LeNet5(), layers=["*"]) == ["features.1", "features.4", "classifier.2", "classifier.4"]
    resnet = resnet_cifar(20, width=8)
    assert conv_activation_names(resnet, ("ReLU",)) == activation_names(resnet, ("ReLU",))   # all follow a conv
    assert len(placed(vgg("vgg11", width=0.25))) == 8
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].overrides: 'classifier.2' matches no ReLU "
                                                      r"module after a convolution; available: features.1, features.4"):
        placed(LeNet5(), overrides={"classifier.2": 0.25})
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(compresskit.ConfigError, match=r"stages\[0\].after: no ReLU modules after a convolution "
                                                      r"\(set layers: \['\*'\] to follow every one\) in Sequential"):
        placed(mlp)
    assert placed(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), layers=["*"]) == ["1"]


def _build(mode: str, **stage) -> compresskit.RunResult:
    """LeNet-5 with block WTA on digits, no training (seeded init), converted as ``sparse_execution`` says."""
    recipe = {"model": {"name": "lenet5"}, "data": {"name": "digits"},
              "stages": [{"plugin": "dasnet", "blocks": 2, "sparse_execution": mode, "tune_batches": [1, 7],
                          **stage}]}
    return compresskit.run(compresskit.validate_recipe(recipe, require_model=True))


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


SPARSE_TYPES = (SparseConv2d, SparseLinear, SparsePool)


def test_sparse_execution_never_and_always_are_reproducible():
    never = _build("never")
    assert not any(isinstance(m, SPARSE_TYPES) for m in never.model.modules())
    stage = never.report["stages"][0]
    assert stage["sparse_execution"] == "never" and stage["sparse_execution_timings"] == []
    assert stage["sparse_execution_choice"] == {
        name: {"path": "dense", "batch_sizes": [], "reason": "sparse_execution: never"}
        for name in ("features.1", "features.4")}
    always, again = _build("always", layers=["*"]), _build("always", layers=["*"])
    assert any(isinstance(m, SparseConv2d) for m in always.model.modules())
    assert any(isinstance(m, SparseLinear) for m in always.model.modules())
    assert _structure(always.model) == _structure(again.model) != _structure(never.model)
    assert always.model.state_dict().keys() == again.model.state_dict().keys()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in always.model.state_dict().items())
    stage = always.report["stages"][0]
    assert stage["sparse_execution_timings"] == [] and stage["sparse_execution_layers"] > 0
    assert set(stage["sparse_execution_choice"]) == {"features.1", "features.4", "classifier.2", "classifier.4"}
    assert all(c == {"path": "sparse", "batch_sizes": [1, 7], "reason": "sparse_execution: always"}
               for c in stage["sparse_execution_choice"].values())
    assert set(prepacked_batch_sizes(always.model)) == ({1, 7} if onednn.prepack_available() else set())
    dense = _build("never", layers=["*"]).model.eval()           # the same seeded weights, masked dense path
    assert _structure(_build("never").model) == _structure(never.model)
    always.model.eval()
    compact_inputs = []
    for m in always.model.modules():
        if isinstance(m, SparseConv2d) and not m.dense_input:       # the stem conv gets the image
            m.register_forward_pre_hook(lambda mod, args: compact_inputs.append(isinstance(args[0], ChannelSparse)))
    for batch in (1, 7, 9):                      # 9 is not in tune_batches: the masked path there
        x = torch.randn(batch, 1, 32, 32)
        with torch.no_grad():
            assert torch.allclose(always.model(x), dense(x), atol=1e-5, rtol=1e-5)
        assert compact_inputs and all(compact_inputs) == (batch != 9)
        compact_inputs.clear()


@pytest.mark.parametrize("faster", [True, False])
def test_sparse_execution_auto_records_the_timings(monkeypatch, faster):
    def fake_time(model, x, repeats=3):         # compact 1 ms (or 3 ms) against dense 2 ms; prepacked no better
        compact = any(isinstance(m, WTADropout) and x[0].shape[0] in m.compact_batches for m in model.modules())
        return (0.001 if faster else 0.003) if compact else 0.002

    monkeypatch.setattr(convert, "_median_time", fake_time)
    result = _build("auto")
    stage = result.report["stages"][0]
    assert [(t["batch"], t["dense_ms"], t["compact_ms"], t["compact"]) for t in stage["sparse_execution_timings"]] \
        == [(1, 2.0, 1.0 if faster else 3.0, faster), (7, 2.0, 1.0 if faster else 3.0, faster)]
    assert not any(t["prepacked"] for t in stage["sparse_execution_timings"])
    c = "1" if faster else "3"
    kept = "compact" if faster else "masked"    # the tuned dense path times as the masked one here: not 5% faster
    native = f", native {c} ms" if dasnet_native.kernels() is not None else ""   # block WTA: the native kernel too
    reason = "auto: " + "; ".join(f"batch {b}: masked 2 ms, compact {c} ms{native}, tuned dense 2 ms -> {kept}"
                                  for b in (1, 7))
    expected = {"path": "sparse", "batch_sizes": [1, 7], "reason": reason} if faster else \
        {"path": "dense", "batch_sizes": [], "reason": reason}
    assert stage["sparse_execution_choice"] == {"features.1": expected, "features.4": expected}
    assert any(isinstance(m, SPARSE_TYPES) for m in result.model.modules()) == faster


def test_always_without_a_sample_input_is_an_error():
    compression = compresskit.prepare(LeNet5(), {"plugin": "dasnet", "sparse_execution": "always"})
    with pytest.raises(compresskit.ConfigError, match=r"sparse_execution: 'always' needs a sample input"):
        compression.finalize()


@pytest.mark.parametrize("field,value,expected", [
    ("tune_batches", [100000], "tune_batches[0]: got 100000, expected a value >= 1 and <= 64"),
    ("tune_batches", [1, 0], "tune_batches[1]: got 0, expected a value >= 1 and <= 64"),
    ("tune_batches", [1, 1], "tune_batches: got [1, 1], expected 1 to 4 distinct batch sizes"),
    ("tune_batches", [1, 2, 4, 8, 16], "tune_batches: got [1, 2, 4, 8, 16], expected 1 to 4 distinct"),
    ("tune_batches", [], "tune_batches: got [], expected 1 to 4 distinct batch sizes"),
    ("sparsity", 1.0, "sparsity: got 1.0, expected a value >= 0 and < 1"),
    ("sparsity", ".nan", "sparsity: got nan, expected a finite number"),
    ("blocks", 1, "blocks: got 1, expected a value >= 2 and <= 1024"),
    ("blocks", 100000, "blocks: got 100000, expected a value >= 2 and <= 1024"),
    ("weight_pruning", -0.5, "weight_pruning: got -0.5, expected a value >= 0 and < 1"),
    ("overrides", {"features.*": 1.5}, "overrides.features.*: got 1.5, expected a sparsity in [0, 1)"),
    ("after", [], "after: got [], expected at least one activation class name"),
    ("sparse_execution", True, "sparse_execution: got True, expected one of auto, always, never"),
])
def test_bad_numbers_are_refused_by_validate(tmp_path, capsys, field, value, expected):
    import yaml

    path = tmp_path / "r.yaml"
    text = yaml.safe_dump({"model": {"name": "lenet5"}, "data": {"name": "digits"},
                           "stages": [{"plugin": "dasnet", field: value}]})
    path.write_text(text.replace("'.nan'", ".nan"))
    assert main(["validate", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: stages[0].{expected}"), lines


@pytest.mark.parametrize("private", [True, False])
def test_sparse_path_with_and_without_torch_private_attributes(monkeypatch, private):
    """compresskit.torch_private's public fallback (a torch without the private attributes) gives the same outputs,
    registers the dense-output hook once, and still sees an in-place weight change (it recomputes every call)."""
    from compresskit import torch_private
    from compresskit.plugins.dasnet.sparse_exec import dense_output, ensure_dense_output

    monkeypatch.setattr(torch_private, "PRIVATE", private and torch_private.PRIVATE)
    model = resnet_cifar(20, width=8)
    insert_wta(model, 0.5, blocks=2)
    _random_batchnorm_statistics(model)
    model.eval()
    sparse = copy.deepcopy(model)
    assert to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1,), force=True)
    assert ensure_dense_output(sparse) is None                     # already there: not added twice
    calls = []
    sparse.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)
        conv = next(m for m in sparse.modules() if isinstance(m, SparseConv2d))
        twin_conv = dict(model.named_modules())[next(n for n, m in sparse.named_modules() if m is conv)]
        conv.layer.weight.mul_(0.5)
        twin_conv.weight.mul_(0.5)
        torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


def _faked_times(model, ms_by_path, monkeypatch):
    """Make the tuner's timer report ``ms_by_path[path]`` for whatever path the model is set to run."""
    from compresskit.plugins.dasnet.wta import WTADropout

    def fake(m, x, repeats=3):
        with torch.no_grad():
            m(*x)                       # as the timer does: the path's kernels get cut and prepacked
        b = x[0].shape[0]
        convs = [c for c in model.modules() if isinstance(c, SparseConv2d) and not c.dense_input]
        if any(b in c.tuned_dense_batches for c in convs):
            path = "tuned"
        elif any(b in c.prepacked_batches for c in convs):
            path = "prepacked"
        elif any(b in w.compact_batches for w in model.modules() if isinstance(w, WTADropout)):
            path = "compact"
        else:
            path = "masked"
        return ms_by_path[path] / 1e3

    monkeypatch.setattr(convert, "_median_time", fake)


@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_the_tuned_dense_path_equals_the_masked_model(net, monkeypatch):
    """Where the tuned dense form (whole kernels, BatchNorm folded, prepacked) wins the timing, the model computes
    exactly the masked WTA model at that batch size, and the masked path at others, in training and with autograd."""
    model = vgg("vgg11", width=0.25) if net == "vgg" else resnet_cifar(20, width=8)
    insert_wta(model, 0.5, blocks=2)
    _random_batchnorm_statistics(model)
    model.eval()
    tuned = copy.deepcopy(model)
    _faked_times(tuned, {"masked": 10.0, "compact": 9.9, "prepacked": 9.8, "tuned": 6.0}, monkeypatch)
    timings = []
    wrapped = to_sparse_execution(tuned, (torch.randn(4, 3, 32, 32),), batch_sizes=(2,), timings=timings)
    assert wrapped and all(sizes == [] for sizes in wrapped.values())    # kept wrapped, no size runs compactly
    assert timings[0]["tuned"] and not timings[0]["compact"] and timings[0]["tuned_ms"] == 6.0
    convs = [m for m in tuned.modules() if isinstance(m, SparseConv2d)]
    assert convs and all(m.tuned_dense_batches == {2} for m in convs)
    assert convert.tuned_dense_batch_sizes(tuned) == [2]
    calls = []
    hooks = [m.layer.register_forward_pre_hook(lambda *a: calls.append(1)) for m in convs]
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 3, 32, 32)
            calls.clear()
            torch.testing.assert_close(tuned(x), model(x), atol=1e-5, rtol=1e-5)
            assert (len(calls) == 0) == (batch == 2)        # batch 2 never calls the plain layers
    for h in hooks:
        h.remove()
    if onednn.prepack_available():
        assert all(m._cache.get(("dense", "prepacked")) is not None for m in convs)
        assert not any(m.prepacked_kernels() for m in convs)   # the whole kernel is not counted as a slice
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    torch.testing.assert_close(tuned(x), model(x), atol=1e-5, rtol=1e-5)   # autograd: the plain layers
    tuned(x).sum().backward()
    assert x.grad is not None


def test_the_tuner_keeps_the_fastest_path_or_leaves_the_model(monkeypatch):
    """Each batch size gets the fastest path that beats the masked model by 5%; with none, nothing is wrapped."""
    base = resnet_cifar(20, width=8)
    insert_wta(base, 0.5, blocks=2)
    base.eval()
    sample = (torch.randn(4, 3, 32, 32),)
    cases = [({"masked": 10.0, "compact": 7.0, "prepacked": 6.0, "tuned": 8.0}, "prepacked"),
             ({"masked": 10.0, "compact": 7.0, "prepacked": 7.5, "tuned": 8.0}, "compact"),
             ({"masked": 10.0, "compact": 9.8, "prepacked": 9.7, "tuned": 9.6}, "masked")]
    for times, kept in cases:
        model = copy.deepcopy(base)
        _faked_times(model, times, monkeypatch)
        timings = []
        wrapped = to_sparse_execution(model, sample, batch_sizes=(1,), timings=timings)
        record = timings[0]
        assert ("prepacked" if record["prepacked"] else "compact" if record["compact"] else
                "tuned" if record["tuned"] else "masked") == (kept if onednn.prepack_available() or kept != "prepacked"
                                                            else "compact")
        if kept == "masked":
            assert wrapped == {} and not any(isinstance(m, SparseConv2d) for m in model.modules())
        else:
            assert wrapped and all(b == [1] for b in wrapped.values())


def test_the_tuner_times_every_path_in_eval_mode(monkeypatch):
    """The twins and PassFolded wrappers are new modules; built in training mode, they made the tuner time the
    tuned dense path as the plain layers (2x slower at batch 1), so it was never chosen where it should be."""
    model = vgg("vgg11", width=0.25)
    insert_wta(model, 0.5)
    model.eval()
    seen = []

    def timed(m, x, repeats=3):
        seen.append([name for name, mod in m.named_modules() if mod.training])
        return 1.0

    monkeypatch.setattr(convert, "_median_time", timed)
    to_sparse_execution(model, (torch.randn(4, 3, 32, 32),), batch_sizes=(1,))
    assert len(seen) >= 3 and all(not training for training in seen), seen[0][:5]
