"""Every constructor option of nn.EmbeddingBag / nn.Embedding is either honoured by the FIITED twin (outputs and one
SGD step equal the dense module's) or refused by ``from_dense`` with one line naming it. The option lists are walked
from torch's own signatures, so an option a new torch adds fails here until it is decided."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from compresskit.plugins.fiited.natural import NarrowEmbeddingBag
from compresskit.plugins.fiited.embedding import FiitedEmbedding, FiitedEmbeddingBag
from compresskit.plugins.fiited.hashing import HashedEmbeddingBag

ROWS, DIM = 12, 8
HONOURED = "honoured"


def _weight() -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))


# option -> [(value, HONOURED or the refusal's text)]
BAG_CASES = {
    "max_norm": [(1.0, "max_norm=1.0")],
    "norm_type": [(1.0, HONOURED)],            # only read together with max_norm
    "scale_grad_by_freq": [(True, "scale_grad_by_freq=True")],
    "mode": [("sum", HONOURED), ("mean", HONOURED), ("max", "mode 'max'")],
    "sparse": [(True, HONOURED)],
    "_weight": [(_weight, HONOURED)],
    "include_last_offset": [(True, HONOURED)],
    "padding_idx": [(0, "padding_idx=0")],
    "device": [("cpu", HONOURED), ("meta", "meta device")],
    "dtype": [(torch.float32, HONOURED), (torch.float64, "dtype float64"), (torch.bfloat16, "dtype bfloat16")],
}
EMBEDDING_CASES = {
    "padding_idx": [(0, "padding_idx=0")],
    "max_norm": [(1.0, "max_norm=1.0")],
    "norm_type": [(1.0, HONOURED)],
    "scale_grad_by_freq": [(True, "scale_grad_by_freq=True")],
    "sparse": [(True, HONOURED)],
    "_weight": [(_weight, HONOURED)],
    "_freeze": [(True, "frozen weight"), (False, HONOURED)],
    "device": [("cpu", HONOURED), ("meta", "meta device")],
    "dtype": [(torch.float32, HONOURED), (torch.float64, "dtype float64")],
}


def _options(cls: type) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "num_embeddings",
                                                                               "embedding_dim")}


@pytest.mark.parametrize("dense_cls,cases", [(nn.EmbeddingBag, BAG_CASES), (nn.Embedding, EMBEDDING_CASES)])
def test_every_constructor_option_is_decided(dense_cls, cases):
    assert _options(dense_cls) == set(cases), "an option of torch's table is neither honoured nor refused"


def _params(cases):
    return [(option, value, expect) for option, values in cases.items() for value, expect in values]


def _build(dense_cls, option, value):
    torch.manual_seed(0)
    return dense_cls(ROWS, DIM, **{option: value() if callable(value) else value})


def _bag_inputs(include_last_offset: bool):
    ids = torch.tensor([1, 3, 3, 3, 0, 11, 7, 3])
    offsets = torch.tensor([0, 4, 4, 6])                     # a repeated row and an empty bag
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
    return ids, offsets, torch.linspace(0.5, 2.0, ids.numel())


def _step(module, forward):
    """Forward, a loss that weighs every output differently, one SGD step; returns the output."""
    out = forward(module)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    return out.detach()


@pytest.mark.parametrize("option,value,expect", _params(BAG_CASES))
def test_embedding_bag_option(option, value, expect):
    dense = _build(nn.EmbeddingBag, option, value)
    if expect != HONOURED:
        for twin in (lambda: FiitedEmbeddingBag.from_dense(dense, 4), lambda: NarrowEmbeddingBag.from_dense(dense, 4),
                     lambda: HashedEmbeddingBag.from_budget(dense, ROWS * DIM * 2)):
            with pytest.raises(ValueError, match=expect):
                twin()
        return
    twin = FiitedEmbeddingBag.from_dense(dense, 4)
    ids, offsets, weights = _bag_inputs(dense.include_last_offset)
    weighted = dense.mode == "sum"           # per_sample_weights: sum mode only, as in torch

    def forward(m):
        return m(ids, offsets, per_sample_weights=weights if weighted else None)

    torch.testing.assert_close(_step(twin, forward), _step(dense, forward), rtol=0, atol=1e-6)
    torch.testing.assert_close(twin.dense_weight(), dense.weight.detach(), rtol=0, atol=1e-6)
    assert twin.sparse == dense.sparse and twin.include_last_offset == dense.include_last_offset


@pytest.mark.parametrize("option,value,expect", _params(EMBEDDING_CASES))
def test_embedding_option(option, value, expect):
    dense = _build(nn.Embedding, option, value)
    if expect != HONOURED:
        with pytest.raises(ValueError, match=expect):
            FiitedEmbedding.from_dense(dense, 4)
        return
    twin = FiitedEmbedding.from_dense(dense, 4)
    ids = torch.tensor([[1, 3, 3], [3, 0, 11]])
    torch.testing.assert_close(_step(twin, lambda m: m(ids)), _step(dense, lambda m: m(ids)), rtol=0, atol=1e-6)
    torch.testing.assert_close(twin.dense_weight(), dense.weight.detach(), rtol=0, atol=1e-6)
