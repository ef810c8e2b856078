"""DASNet's native WTA kernel (``native/wta.cpp``): in inference it equals the torch path ``x * wta_mask(x)`` bit
for bit (per channel and in blocks, any sign, contiguous and channels-last, batch 1 and more), keeps the memory
format, and leaves training (autograd) to the torch path; a converted model's outputs do not change."""
from __future__ import annotations

import copy

import pytest
import torch

from compresskit.models.resnet_cifar import resnet_cifar
from compresskit.plugins.dasnet import insert_wta, native
from compresskit.plugins.dasnet.native import use_native
from compresskit.plugins.dasnet.wta import WTADropout, unit_groups, wta_mask

NATIVE = native.kernels() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="no C++ compiler: the native WTA kernel is not built here")


@needs_native
@pytest.mark.parametrize("shape", [(1, 32, 16, 16), (6, 64, 8, 8), (3, 48, 1, 1), (5, 40), (2, 24, 5, 7),
                                   (4, 12, 3, 3, 3)])
@pytest.mark.parametrize("blocks", [None, 2, 4])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_native_equals_the_torch_path(shape, blocks, nonnegative):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    x = torch.relu(x) if nonnegative else x
    layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for sparsity in (0.25, 0.5, 0.9):
        for t in layouts:
            units = t.shape[1]
            groups = unit_groups(units, blocks)
            with torch.no_grad():       # the kernel itself (masked_wta would fall back to torch silently)
                got = native.kernels().wta_masked(t, max(1, round((1 - sparsity) * groups)), groups, nonnegative)
            assert torch.equal(got, t * wta_mask(t, sparsity, blocks, nonnegative))
            assert got.stride() == t.stride()                       # the input's memory format
            kept = (got != 0).flatten(2).any(2).sum(1) if t.dim() > 2 else (got != 0).sum(1)
            assert bool((kept <= units // groups * max(1, round((1 - sparsity) * groups))).all())


@needs_native
def test_ties_and_nans_are_ranked_alike():
    """Scores that tie exactly (all-zero or saturated channels, equal neurons) go to the lower group on both paths,
    and NaN ranks above everything, as torch.sort puts it. (Sums that differ only by float rounding may rank apart:
    the native kernel sums in float64; wta.py says so.)"""
    g = torch.Generator().manual_seed(0)
    cases = [torch.ones(2, 8, 2, 2), torch.full((50, 64), 6.0) * (torch.rand(50, 64, generator=g) < 0.7),
             torch.full((6, 16, 5, 5), 6.0) * (torch.rand(6, 16, 1, 1, generator=g) < 0.8)]
    nan = torch.rand(4, 10, 3, 3, generator=g)
    nan[1, 3, 0, 0] = float("nan")
    cases.append(nan)
    for x in cases:
        for blocks in (None, 2):
            groups = unit_groups(x.shape[1], blocks)
            with torch.no_grad():
                got = native.kernels().wta_masked(x, groups // 2, groups, True)
            assert torch.allclose(got, x * wta_mask(x, 0.5, blocks, True), equal_nan=True, atol=0, rtol=0)


@needs_native
def test_training_and_traced_calls_take_the_torch_path():
    x = torch.relu(torch.randn(2, 8, 4, 4)).requires_grad_()
    m = WTADropout(0.5, nonnegative_input=True)
    y = m(x)
    y.sum().backward()                               # autograd through the mask: only the winners get gradient
    assert torch.equal(x.grad, wta_mask(x.detach(), 0.5, None, True).expand_as(x).contiguous())
    with torch.no_grad():
        use_native(False)
        ref = m.eval()(x.detach())
        use_native(True)
        assert torch.equal(m(x.detach()), ref)
        traced = torch.export.export(m, (x.detach(),)).module()   # traced: plain torch ops, no native call
    ops = {str(n.target) for n in torch.export.export(m, (x.detach(),)).graph.nodes if n.op == "call_function"}
    assert not any("wta_masked" in op for op in ops) and any("topk" in op or "sort" in op for op in ops)
    other = torch.relu(torch.randn(2, 8, 4, 4))
    with torch.no_grad():
        assert torch.equal(traced(other), m(other))


@needs_native
def test_a_wta_model_gives_the_same_outputs_native_or_not():
    torch.manual_seed(0)
    model = resnet_cifar(20, width=16).eval()
    insert_wta(model, 0.5)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        use_native(False)
        ref = twin(x)
        use_native(True)
        assert torch.equal(model(x), ref)
