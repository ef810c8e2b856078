"""DASNet: WTA keeps exactly the top-k channels per sample, adds no parameters, inserts by pattern with clear
errors, the sparse execution path equals the dense masked computation, and it composes with pruning + int8."""
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
from compresskit.plugins.dasnet import onednn
from compresskit.plugins.dasnet import (
    ChannelSparse,
    PassFolded,
    SparseConv2d,
    SparsePool,
    WTADropout,
    compact_wta,
    insert_wta,
    prepacked_batch_sizes,
    to_sparse_execution,
    wta_mask,
)


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
        convs = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
        packs = prepack and onednn.prepack_available()      # the shim's public fallback cannot prepack
        assert all(m.prepacked_batches == ({batch} if packs else set()) for m in convs)
        widths = []                                  # input channels each wrapped conv really computes on
        for m in sparse.modules():
            if isinstance(m, SparseConv2d):
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
    cases = [(resnet_cifar(20, width=8), 20, 9), (vgg("vgg11", width=0.25), 7, 7), (ConvFeedsTwo(), 0, 0),
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
            assert chosen and chosen <= {1, 8}
            assert all(m.compact_batches == chosen and not m.compact_always for m in wta)
            assert any(isinstance(m, SparseConv2d) for m in model.modules())
            assert set(prepacked_batch_sizes(model)) <= chosen     # prepacking only tried where compact won
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
    assert stage["wta_layers"] == 4 and stage["int8_linear_layers"] == 3
    assert stage["weight_zero_fraction"] == pytest.approx(0.5, abs=0.01)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    assert sum(isinstance(m, DynamicQuantizedLinear) for m in result.model.modules()) == 3
    final = result.report["training"]["final_test"]["accuracy"]
    assert final > 0.5
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any("_packed_params" in k for k in state)


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
