"""DASNet's oneDNN shim (``compresskit.plugins.dasnet.onednn``): the private operators and the public fallback both
compute ``F.conv2d`` (plain, fused ReLU, prepacked kernels; grouped, strided, padded, dilated), the fallback is
taken where the operators are missing, fail or are switched off, the sparse path gives the same outputs either way,
BatchNorm folding is torch.nn.utils.fusion's, and the tuner times with torch.utils.benchmark and keeps the faster
path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from compresskit.models.resnet_cifar import resnet_cifar
from compresskit.plugins.dasnet import (
    ChannelSparse,
    SparseConv2d,
    WTADropout,
    convert,
    insert_wta,
    onednn,
    prepacked_batch_sizes,
    to_sparse_execution,
)
from compresskit.plugins.dasnet.fuse import folded_batchnorms
from compresskit.plugins.dasnet import native as dasnet_native

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def private():
    """The private operators switched on; skips where this torch lacks them (see test_probe_...)."""
    previous = onednn.use_private_ops(True)
    try:
        if not onednn.private_ops_enabled():
            pytest.skip(f"private oneDNN operators unavailable: {onednn.probe().reason}")
        yield
    finally:
        onednn.use_private_ops(previous)


@pytest.fixture
def fallback():
    """The public fallback forced."""
    previous = onednn.use_private_ops(False)
    yield
    onednn.use_private_ops(previous)


@pytest.fixture(params=["private", "fallback"])
def mode(request):
    request.getfixturevalue(request.param)
    return request.param


def test_probe_finds_private_ops_on_tested_torch():
    support = onednn.probe()
    if onednn._torch_version() >= onednn.MIN_TORCH and torch.backends.mkldnn.is_available():
        assert support == onednn.Support(True, True, ""), support.reason    # else every private test would skip
    else:
        assert not support.conv and not support.prepack and support.reason


CONVS = {   # in, out, kernel, stride, padding, dilation, groups, bias
    "plain": (6, 8, 3, 1, 1, 1, 1, True),
    "grouped-strided-padded": (6, 9, 3, 2, (2, 1), 1, 3, False),
    "depthwise-dilated": (8, 8, 3, 1, 2, 2, 8, True),
    "rect-strided-grouped": (4, 6, (1, 3), (2, 1), 0, 1, 2, True),
}


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_matches_functional(name, relu, mode):
    torch.manual_seed(0)
    cin, cout, k, stride, padding, dilation, groups, bias = CONVS[name]
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias)
    weight, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    packed = onednn.prepack_conv_weight(weight, conv, (1, cin, 9, 10))      # packed for batch 1, used for 3 too
    if mode == "private":
        assert packed is not None and packed.is_mkldnn
    else:
        assert packed is None and not onednn.prepack_available()
    for batch in (1, 3):
        x = torch.randn(batch, cin, 9, 10)
        assert onednn.applies(x, conv) == (mode == "private")
        assert not onednn.applies(x.double(), conv)
        expected = F.conv2d(x, weight, b, stride, padding, dilation, groups)
        expected = expected.relu() if relu else expected
        with torch.no_grad():
            y = onednn.conv2d(x, weight, b, conv, relu)
            if mode == "fallback":
                assert torch.equal(y, expected)                 # F.conv2d itself, bit for bit
            else:
                assert y.shape == expected.shape and torch.allclose(y, expected, **TOL)
                y = onednn.conv2d(x, packed, b, conv, relu)
                assert y.shape == expected.shape and torch.allclose(y, expected, **TOL)
                assert y.is_contiguous(memory_format=torch.channels_last)   # prepacked: computes channels-last
        if relu:
            assert (y >= 0).all() and (expected == 0).any()


def test_prepacked_weight_still_works_after_switching_off(private):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    packed = onednn.prepack_conv_weight(conv.weight, conv, x.shape)
    onednn.use_private_ops(False)             # the fixture restores the setting
    assert not onednn.private_ops_enabled()
    with torch.no_grad():
        y = onednn.conv2d(x, packed, conv.bias, conv, relu=True)
        assert torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1).relu())


def test_switch_and_environment_variable(monkeypatch, private):
    monkeypatch.setenv(onednn.ENV, "0")
    assert onednn.private_ops_enabled()                  # an explicit use_private_ops(True) wins over the variable
    onednn.use_private_ops(None)                         # back to the variable (read again)
    assert not onednn.private_ops_enabled() and not onednn.prepack_available()
    conv = nn.Conv2d(3, 4, 3)
    assert onednn.prepack_conv_weight(conv.weight, conv, (1, 3, 5, 5)) is None
    for value, enabled in (("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(onednn.ENV, value)
        onednn.use_private_ops(None)
        assert onednn.private_ops_enabled() == enabled
    monkeypatch.delenv(onednn.ENV)
    onednn.use_private_ops(None)
    assert onednn.private_ops_enabled() and onednn.prepack_available()


class _Raises:
    def __init__(self, exc: type[Exception]) -> None:
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc("changed in this release")


@pytest.mark.parametrize("breakage", ["missing", "conv fails", "prepack fails", "old torch"])
def test_broken_private_ops_fall_back(monkeypatch, private, breakage):
    real = onednn._lookup_ops()
    with monkeypatch.context() as mp:
        if breakage == "missing":
            mp.setattr(onednn, "_lookup_ops", _Raises(AttributeError))
        elif breakage == "conv fails":
            mp.setattr(onednn, "_lookup_ops", lambda: (real[0], _Raises(RuntimeError), _Raises(TypeError)))
        elif breakage == "prepack fails":
            mp.setattr(onednn, "_lookup_ops", lambda: (_Raises(RuntimeError), real[1], real[2]))
        else:
            mp.setattr(onednn, "MIN_TORCH", (99, 0))
        try:
            support = onednn.probe(refresh=True)
            assert support.conv == (breakage == "prepack fails") and not support.prepack
            assert {"missing": "missing", "conv fails": "failed", "prepack fails": "prepacked",
                    "old torch": "older"}[breakage] in support.reason
            assert onednn.private_ops_enabled() == support.conv and not onednn.prepack_available()
            torch.manual_seed(0)
            conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
            x = torch.randn(2, 4, 8, 8)
            assert onednn.prepack_conv_weight(conv.weight, conv, x.shape) is None
            with torch.no_grad():
                y = onednn.conv2d(x, conv.weight, conv.bias, conv, relu=True)
                expected = F.conv2d(x, conv.weight, conv.bias, 2, 1).relu()
                assert torch.allclose(y, expected, **TOL)
                if not support.conv:
                    assert torch.equal(y, expected)
        finally:
            mp.undo()
            onednn.probe(refresh=True)
    assert onednn.private_ops_enabled() and onednn.prepack_available()


def _random_batchnorm_statistics(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    count = [0]
    real = getattr(module, name)

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counting)
    return count


@pytest.mark.parametrize("blocks", [None, 2])
def test_sparse_execution_same_with_fallback(monkeypatch, private, blocks):
    monkeypatch.setattr(dasnet_native, "_USE_NATIVE", [False])   # every compact conv on oneDNN or its fallback
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8)          # residual adds, strided shortcuts, pooling: the sparse path's cases
    _random_batchnorm_statistics(model)
    insert_wta(model, 0.5, blocks=blocks)
    model.eval()
    sparse = copy.deepcopy(model)
    to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 3), force=True)
    assert prepacked_batch_sizes(sparse) == [1, 3]
    convs = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]
    parts = [0]             # compact convolutions: one a part of a ChannelSparse input (a sample, per-sample sets)
    for m in convs:
        m.register_forward_pre_hook(lambda mod, args: parts.__setitem__(
            0, parts[0] + sum(len(p.data) if p.per_sample else 1 for p in args[0].parts))
            if isinstance(args[0], ChannelSparse) else None)
    conv2d_calls = _count_calls(monkeypatch, F, "conv2d")
    xs = [torch.randn(batch, 3, 32, 32) for batch in (1, 3)]
    runs = {}
    for label in ("private", "fallback"):
        onednn.use_private_ops(label == "private")          # the fixture restores the setting
        parts[0] = conv2d_calls[0] = 0
        with torch.no_grad():
            runs[label] = [sparse(x) for x in xs], parts[0], conv2d_calls[0]
    (private_out, private_parts, private_calls), (fallback_out, fallback_parts, fallback_calls) = runs.values()
    assert private_parts == fallback_parts > 0
    stems = sum(m.dense_input for m in convs)                   # the stem runs as the tuned dense layer, once a call
    assert stems == 1
    assert fallback_calls - private_calls == fallback_parts + stems * len(xs)   # the fallback runs them on F.conv2d
    with torch.no_grad():
        for x, a, b in zip(xs, private_out, fallback_out):
            assert torch.allclose(a, b, **TOL) and torch.allclose(b, model(x), **TOL)
    assert bool(sum(m.prepacked_kernels() for m in convs)) == (blocks is not None)   # private run used them

    onednn.use_private_ops(False)             # converted with the fallback forced: no prepacked kernels at all
    fresh = copy.deepcopy(model)
    to_sparse_execution(fresh, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 3), force=True)
    assert prepacked_batch_sizes(fresh) == []
    with torch.no_grad():
        for x, a in zip(xs, fallback_out):
            assert torch.allclose(fresh(x), a, **TOL)
    assert not any(k.is_mkldnn for m in fresh.modules() if isinstance(m, SparseConv2d) for k in m._cache.values())


class ConvNet(nn.Module):
    """Conv-BN-ReLU blocks with WTA in between; biasless conv, BatchNorm without affine terms, one BN followed by a
    pool instead of a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
            nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_batchnorm_folding_is_torch_fusion(mode):
    torch.manual_seed(0)
    model = ConvNet()
    _random_batchnorm_statistics(model)
    insert_wta(model, 0.5, blocks=2)
    model.eval()
    sparse = copy.deepcopy(model)
    to_sparse_execution(sparse, (torch.randn(4, 3, 16, 16),), batch_sizes=(1, 5), force=True)
    twins = [m for m in sparse.modules() if isinstance(m, SparseConv2d)]       # the stem's twin first
    assert folded_batchnorms(sparse) == len(twins) == 4 and [m.dense_input for m in twins] == [True] + [False] * 3
    assert [m.fused_relu for m in twins] == [True, True, True, False]
    for twin in twins:                        # the folded kernel and bias are fuse_conv_bn_eval's, exactly
        weight, bias = twin._weight_and_bias()
        fused = fuse_conv_bn_eval(copy.deepcopy(twin.layer), copy.deepcopy(twin.folded_bn))
        assert torch.equal(weight, fused.weight) and torch.equal(bias, fused.bias)
        assert not isinstance(weight, nn.Parameter) and not weight.requires_grad
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(sparse(x), model(x), **TOL)          # the unfused eval model (masked dense)


def _fake_timings(times: dict[str, float]):
    """A stand-in for the tuner's timer: the time of the path the model is set to (dense, compact, prepacked)."""
    def timing(model: nn.Module, x: tuple[torch.Tensor, ...]) -> float:
        batch = x[0].shape[0]
        if not all(batch in m.compact_batches for m in model.modules() if isinstance(m, WTADropout)):
            return times["dense"]
        convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
        with torch.no_grad():
            model(*x)                          # builds the prepacked kernels the tuner checks for
        return times["prepacked" if any(batch in m.prepacked_batches for m in convs) else "compact"]
    return timing


@pytest.mark.parametrize("times, compact, prepacked", [
    ({"dense": 1.0, "compact": 0.97, "prepacked": 0.96}, False, False),    # under the 5% margin: masked path kept
    ({"dense": 1.0, "compact": 0.97, "prepacked": 0.5}, True, True),       # prepacked slices alone beat it
    ({"dense": 1.0, "compact": 0.8, "prepacked": 0.9}, True, False),       # prepacking slower: plain kernels
    ({"dense": 1.0, "compact": 0.8, "prepacked": 0.7}, True, True),
])
def test_tuner_keeps_the_faster_path(monkeypatch, mode, times, compact, prepacked):
    monkeypatch.setattr(convert, "_median_time", _fake_timings(times))
    torch.manual_seed(0)
    model = ConvNet()
    insert_wta(model, 0.5, blocks=2)
    before = [type(m) for m in model.modules()]
    decisions = to_sparse_execution(model, (torch.randn(4, 3, 16, 16),), batch_sizes=(1, 4))
    if compact and times["compact"] >= 0.95 * times["dense"] and mode != "private":
        compact = False                    # the fallback cannot prepack: only the plain compact path was timed
    if not compact:
        assert decisions == {} and [type(m) for m in model.modules()] == before
        return
    assert decisions and all(batches == [1, 4] for batches in decisions.values())
    expected = [1, 4] if prepacked and mode == "private" else []      # the fallback never tries prepacking
    assert prepacked_batch_sizes(model) == expected


def test_tuner_timer_runs_the_model_as_the_process_would():
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
            return x + 1

    seconds = convert._median_time(Probe(), (torch.zeros(2),))
    assert 0 < seconds < 1
    assert seen == [(torch.get_num_threads(), False)] * 9      # 3 timed calls, each after 2 warm-up calls
