"""DASNet's compact path on native kernels: ``native/sparse_conv.cpp`` (a convolution over only the kept input
channels, read from a weight packed once) equals ``F.conv2d`` on the masked input; ``wta_compact`` (per channel)
and ``wta_winners`` (blocks) equal the torch path's winners and data; ``add_channels`` equals a scatter into a
copy; and a converted per-channel model runs its compact convolutions natively and matches the masked dense
model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from compresskit.models.resnet_cifar import resnet_cifar
from compresskit.models.vgg import vgg
from compresskit.plugins.dasnet import insert_wta, native, native_batch_sizes, to_sparse_execution
from compresskit.plugins.dasnet.compact import ChannelSparse, Part
from compresskit.plugins.dasnet.sparse_exec import SparseConv2d
from compresskit.plugins.dasnet.native import use_native
from compresskit.plugins.dasnet.wta import compact_wta, wta_mask

NATIVE = native.kernels() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="no C++ compiler: the native DASNet kernels are not built here")


def _both_paths(fn):
    """``fn()`` without autograd on the native kernels, then on the torch path only."""
    with torch.no_grad():
        got = fn()
        use_native(False)
        try:
            return got, fn()
        finally:
            use_native(True)


def _masked_reference(x, channels, weight, bias, stride, padding):
    """F.conv2d over x with only ``channels`` ([k] or [n, k]) kept."""
    mask = torch.zeros(x.shape[0], x.shape[1])
    mask.scatter_(1, channels if channels.dim() == 2 else channels.expand(x.shape[0], -1), 1.0)
    return F.conv2d(x * mask[:, :, None, None], weight, bias, stride, padding)


@needs_native
@pytest.mark.parametrize("cin,cout,size,kernel,stride,padding", [
    (16, 10, 7, 3, 1, 1),      # fewer outputs than a vector
    (24, 48, 9, 3, 2, 1),      # strided, three vectors
    (32, 80, 6, 1, 1, 0),      # 1x1, a full block and a one-vector block
    (8, 20, 11, 5, 2, 2),      # 5x5, padding 2
    (64, 128, 4, 3, 1, 1),     # two full blocks
    (12, 16, 3, 3, 1, 0),      # one output pixel
])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sparse_input_conv_equals_conv_of_masked_input(cin, cout, size, kernel, stride, padding, per_sample, layout):
    g = torch.Generator().manual_seed(cin * cout + size)
    n, k = 3, max(1, cin // 2)
    x = torch.randn(n, cin, size, size, generator=g)
    w, b = torch.randn(cout, cin, kernel, kernel, generator=g), torch.randn(cout, generator=g)
    if per_sample:
        channels = torch.stack([torch.randperm(cin, generator=g)[:k].sort().values for _ in range(n)])
        data = torch.stack([x[i, channels[i]] for i in range(n)])
    else:
        channels = torch.randperm(cin, generator=g)[:k].sort().values
        data = x[:, channels]
    if layout == "channels_last":
        data = data.contiguous(memory_format=torch.channels_last)
    packed = native.kernels().pack_conv_weight(w)
    for bias in (b, None):
        ref = _masked_reference(x, channels, w, bias, stride, padding)
        for relu in (False, True):
            got = native.kernels().sparse_input_conv2d(data, channels, packed, torch.empty(0) if bias is None else bias,
                                                       cout, kernel, kernel, stride, stride, padding, padding, relu)
            assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
            expected = ref.relu() if relu else ref
            assert torch.allclose(got, expected, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


@needs_native
def test_sparse_input_conv_rejects_bad_channels():
    w = torch.randn(8, 4, 3, 3)
    packed = native.kernels().pack_conv_weight(w)
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="out of range"):
        native.kernels().sparse_input_conv2d(x, torch.tensor([0, 4]), packed, torch.empty(0), 8, 3, 3, 1, 1, 1, 1,
                                             False)
    with pytest.raises(RuntimeError, match="one a kept channel"):
        native.kernels().sparse_input_conv2d(x, torch.tensor([0, 1, 2]), packed, torch.empty(0), 8, 3, 3, 1, 1, 1, 1,
                                             False)


@needs_native
@pytest.mark.parametrize("shape", [(1, 32, 8, 8), (5, 24, 3, 5), (4, 40), (2, 6, 2, 2, 2)])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_native_compact_wta_equals_the_torch_path(shape, nonnegative):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    x = x.relu() if nonnegative else x
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for t in layouts:
        got, ref = _both_paths(lambda: compact_wta(t, 0.5, None, nonnegative))
        (a,), (b,) = got.parts, ref.parts
        assert a.per_sample and b.per_sample and a.rows is None
        assert torch.equal(a.channels, b.channels) and torch.equal(a.data, b.data)
        assert torch.equal(got.dense(), t * wta_mask(t, 0.5, None, nonnegative))


@needs_native
@pytest.mark.parametrize("shape", [(1, 32, 8, 8), (7, 24, 3, 5), (6, 40)])
@pytest.mark.parametrize("blocks", [2, 4])
def test_native_block_winners_group_samples_as_the_torch_path(shape, blocks):
    """Block WTA's compact form with the winners from ``wta_winners``: the same parts (samples, channels, data)
    as the torch ranking gives, ties included (all-zero samples)."""
    g = torch.Generator().manual_seed(sum(shape) + blocks)
    x = torch.randn(*shape, generator=g).relu()
    x[0] = 0.0                                     # an all-zero sample: every group ties, the lowest win
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for t in layouts:
        got, ref = _both_paths(lambda: compact_wta(t, 0.5, blocks, True))
        assert [(p.key, None if p.rows is None else p.rows.tolist()) for p in got.parts] == \
            [(p.key, None if p.rows is None else p.rows.tolist()) for p in ref.parts]
        assert all(torch.equal(a.channels, b.channels) and torch.equal(a.data, b.data)
                   for a, b in zip(got.parts, ref.parts))
        assert torch.equal(got.dense(), t * wta_mask(t, 0.5, blocks, True))


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_add_channels_equals_a_scatter_into_a_copy(layout, per_sample):
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(3, 12, 4, 5, generator=g)
    if layout == "channels_last":
        dense = dense.contiguous(memory_format=torch.channels_last)
    channels = torch.stack([torch.randperm(12, generator=g)[:5].sort().values for _ in range(3)]) if per_sample \
        else torch.tensor([0, 3, 4, 9, 11])
    sparse = ChannelSparse(3, 12, [Part(None, channels, torch.randn(3, 5, 4, 5, generator=g))])
    got, ref = _both_paths(lambda: dense + sparse)     # ChannelSparse's residual add: the native pass, then torch's
    assert torch.allclose(got, ref, atol=0, rtol=0) and got.stride() == dense.stride()
    assert torch.equal(got, dense + sparse.dense())


def _native_convs(model: torch.nn.Module) -> int:
    return sum(("native",) in m._cache for m in model.modules() if isinstance(m, SparseConv2d))


@needs_native
@pytest.mark.parametrize("net", ["resnet", "vgg"])
def test_per_channel_model_runs_natively_and_matches_masked(net):
    """Residual adds, strided convolutions, pooling and folded BatchNorm: the converted per-channel model's compact
    convolutions run on the native kernel (their packed weights are cached) and give the masked model's outputs."""
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8) if net == "resnet" else vgg("vgg11", width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    insert_wta(model, 0.5)
    model.eval()
    sparse = copy.deepcopy(model)
    to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 3), force=True)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 32)
            out, ref = sparse(x), model(x)
            assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    convs = {name: m for name, m in sparse.named_modules() if isinstance(m, SparseConv2d) and not m.dense_input}
    assert convs and _native_convs(sparse) == len(convs)
    name, twin = next(iter(convs.items()))
    with torch.no_grad():                          # a weight changed in place: the packed weight is rebuilt
        twin.layer.weight.mul_(2.0)
        model.get_submodule(name).weight.mul_(2.0)
        x = torch.randn(1, 3, 32, 32)
        out, ref = sparse(x), model(x)
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


@needs_native
def test_tuner_keeps_the_native_path_for_block_wta_where_it_is_fastest(monkeypatch):
    """Block WTA's shared channel sets run on oneDNN slices unless the tuner finds the native kernel faster: then
    every compact convolution of that batch size runs natively (recorded in ``native_batches``), with the masked
    model's outputs."""
    from compresskit.plugins.dasnet import convert

    def fake_time(model, x, repeats=3):            # native 1 ms, every other path 2 ms
        native_run = any(x[0].shape[0] in m.native_batches for m in model.modules() if isinstance(m, SparseConv2d))
        return 0.001 if native_run else 0.002

    monkeypatch.setattr(convert, "_median_time", fake_time)
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8)
    insert_wta(model, 0.5, blocks=2)
    model.eval()
    sparse = copy.deepcopy(model)
    timings: list[dict] = []
    to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1,), timings=timings)
    assert timings[0]["native"] and timings[0]["native_ms"] == 1.0 and native_batch_sizes(sparse) == [1]
    convs = [m for m in sparse.modules() if isinstance(m, SparseConv2d) and not m.dense_input]
    assert all(m.record_args()["native_batches"] == [1] for m in convs)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        out, ref = sparse(x), model(x)
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    assert _native_convs(sparse) == len(convs)


@needs_native
def test_relu_keeps_nan_and_narrow_layers_pack_no_padding_block():
    """The fused ReLU keeps a NaN as torch's ReLU does, and a layer with fewer outputs than a block packs only its
    own outputs (rounded up to whole vectors), not a full block."""
    k = native.kernels()
    x = torch.ones(1, 2, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    w = torch.ones(4, 2, 1, 1)
    got = k.sparse_input_conv2d(x, torch.tensor([0, 1]), k.pack_conv_weight(w), torch.empty(0), 4, 1, 1, 1, 1, 0, 0,
                                True)
    ref = F.conv2d(x, w).relu()
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got.isnan().any())
    lanes = k.pack_conv_weight(torch.randn(1, 3, 3, 3)).shape[3]    # one output: one vector's width
    for cout in (1, lanes, lanes + 1, k.conv_block(), k.conv_block() + 1):
        packed = k.pack_conv_weight(torch.randn(cout, 3, 3, 3))
        block = min(k.conv_block(), -(-cout // lanes) * lanes)
        assert packed.shape == (-(-cout // block), 3, 9, block)


@needs_native
def test_empty_batch_and_unused_packed_weights():
    """A batch of no samples goes through a per-sample part (native and fallback); a conv the tuner did not keep
    on the native kernel drops its packed weight."""
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8)
    insert_wta(model, 0.5)
    model.eval()
    sparse = copy.deepcopy(model)
    to_sparse_execution(sparse, (torch.randn(4, 3, 32, 32),), batch_sizes=(1,), force=True)
    with torch.no_grad():
        for on in (True, False):
            use_native(on)
            try:
                assert sparse(torch.randn(0, 3, 32, 32)).shape == (0, 10)
            finally:
                use_native(True)
    twin = next(m for m in sparse.modules() if isinstance(m, SparseConv2d) and not m.dense_input)
    assert ("native",) in twin._cache                   # per-sample sets ran on it: kept
    twin.drop_unused_kernels()
    assert ("native",) in twin._cache
    block = resnet_cifar(8, width=8)
    insert_wta(block, 0.5, blocks=2)
    block.eval()
    to_sparse_execution(block, (torch.randn(4, 3, 32, 32),), batch_sizes=(1,), force=True)
    twins = [m for m in block.modules() if isinstance(m, SparseConv2d) and not m.dense_input]
    for m in twins:
        m.native_batches = {1}
    with torch.no_grad():
        block(torch.randn(1, 3, 32, 32))
    assert all(("native",) in m._cache for m in twins)
    for m in twins:
        m.native_batches = set()
        m.drop_unused_kernels()
    assert not any(("native",) in m._cache for m in twins)   # shared sets only, not kept natively: dropped
