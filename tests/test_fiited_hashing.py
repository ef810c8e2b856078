"""The hashing-family baselines (hashing trick, QR, ROBE, TT-Rec): drop-in forwards equal to their dense
equivalents, their own structure (QR never collides on both tables, TT-Rec's cores contract to the rows), bytes
within the budget they were sized to, gradients, and the ``method:`` values of the fiited stage end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresskit.plugins.fiited.hashing import (HASHED_TABLES, HashedEmbeddingBag, QREmbeddingBag,
                                                RobeEmbeddingBag, TTEmbeddingBag)

ROWS, DIM = 1000, 16
KINDS = sorted(HASHED_TABLES)


def _dense(bag: bool = True, mode: str = "sum", last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if bag:
        return nn.EmbeddingBag(ROWS, DIM, mode=mode, include_last_offset=last)
    return nn.Embedding(ROWS, DIM)


def _budget(ratio: float) -> int:
    return int(ratio * ROWS * DIM * 4)


def _stored(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,last", [("sum", False), ("mean", False), ("sum", True)])
def test_forward_equals_the_dense_equivalent(kind, mode, last):
    module = HASHED_TABLES[kind].from_budget(_dense(mode=mode, last=last), _budget(0.1), seed=3)
    dense = module.to_dense()
    ids = torch.randint(0, ROWS, (40,))
    offsets = torch.tensor([0, 5, 5, 17, 30] + ([40] if last else []))
    cases = [(ids, offsets, None), (ids.view(8, 5), None, None), (ids[:0], torch.tensor([0, 0] + [0] * last), None)]
    if mode == "sum":
        cases += [(ids, offsets, torch.rand(40)), (ids.view(8, 5), None, torch.rand(8, 5))]
    for i, o, w in cases:
        assert torch.allclose(module(i, o, w), dense(i, o, per_sample_weights=w), atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        module(torch.tensor([ROWS]), torch.tensor([0]))


@pytest.mark.parametrize("kind", ["hashing", "robe"])
def test_an_exported_hashed_table_still_refuses_out_of_range_ids(kind):
    module = HASHED_TABLES[kind].from_budget(_dense(), _budget(0.1)).eval()
    program = torch.export.export(module, (torch.tensor([1, 2, 3]), torch.tensor([0, 1]))).module()
    ids, offsets = torch.tensor([5, 7, 999]), torch.tensor([0, 2])
    assert torch.allclose(program(ids, offsets), module(ids, offsets))
    for bad in (ROWS, -1):    # a hash would map them into range: the graph checks them first
        with pytest.raises(RuntimeError, match="out of DATA bounds"):
            program(torch.tensor([5, 7, bad]), offsets)


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_form_and_gradients(kind):
    module = HASHED_TABLES[kind].from_budget(_dense(bag=False), _budget(0.2))
    ids = torch.randint(0, ROWS, (3, 7))
    out = module(ids)
    assert out.shape == (3, 7, DIM)
    assert torch.allclose(out, F.embedding(ids, module.to_dense().weight), atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.5])
def test_bytes_are_what_it_stores_and_fit_the_budget(kind, ratio):
    if kind == "qr" and ratio == 0.02:    # 20 rows: two tables need at least 2 sqrt(1000) = 64
        with pytest.raises(ValueError, match="needs at least 64"):
            HASHED_TABLES[kind].from_budget(_dense(), _budget(ratio))
        return
    module = HASHED_TABLES[kind].from_budget(_dense(), _budget(ratio))
    mem = module.table_bytes()
    assert mem.total == mem.serving == _stored(module) <= _budget(ratio)
    assert mem.total >= 0.5 * _budget(ratio)          # it uses the bytes it was given (TT: rank steps)


def test_each_method_has_its_structure():
    # the hashing trick: rows shared through one hash; no hashing when the rows fit
    hashed = HashedEmbeddingBag(ROWS, DIM, rows=100, seed=1)
    assert hashed.weight.shape == (100, DIM)
    a, b = (int(v) for v in hashed.hash_params[0])
    assert torch.equal(hashed.to_dense().weight[7], hashed.weight[(7 * a + b) % (2**31 - 1) % 100])
    whole = HashedEmbeddingBag(ROWS, DIM, rows=5000)
    assert whole.rows == ROWS and torch.equal(whole.embed(torch.arange(ROWS)), whole.weight)
    # QR: (quotient, remainder) differ for any two ids, at (ceil(n / c) + c) rows
    qr = QREmbeddingBag(ROWS, DIM, collisions=32)
    assert qr.quotient.shape[0] == 32 and qr.remainder.shape[0] == 32
    ids = torch.arange(ROWS)
    assert len({(int(i) // 32, int(i) % 32) for i in ids}) == ROWS
    assert torch.allclose(qr.embed(ids[40:41]), qr.quotient[1] * qr.remainder[8])
    # ROBE: blocks of the shared array at hashed offsets, wrapping around
    robe = RobeEmbeddingBag(ROWS, DIM, size=50, block=8)
    row = robe.embed(torch.tensor([9]))[0]
    a, b = robe.hash_params[0]
    for j in range(DIM // 8):
        start = int(((9 * 2 + j) * a + b) % (2**31 - 1) % 50)
        assert torch.equal(row[8 * j:8 * j + 8], robe.array[(start + torch.arange(8)) % 50])
    # TT-Rec: row (i1, i2, i3) is the product of the three cores' slices
    tt = TTEmbeddingBag(ROWS, DIM, rank=3)
    n1, n2, n3 = tt.row_factors
    assert n1 * n2 * n3 >= ROWS and tt.dim_factors[0] * tt.dim_factors[1] * tt.dim_factors[2] == DIM
    i = 777
    i1, i2, i3 = i // (n2 * n3), (i // n3) % n2, i % n3
    d1, d2, d3 = tt.dim_factors
    expected = torch.einsum("ar,rbs,sc->abc", tt.core1[i1], tt.core2[i2].view(3, d2, 3), tt.core3[i3])
    assert torch.allclose(tt.embed(torch.tensor([i]))[0], expected.reshape(-1), atol=1e-6)


def test_a_budget_is_shared_with_a_floor_for_small_tables():
    from compresskit.plugins.fiited.hashing import share_budget

    tables = [(3, 16), (50, 16), (10_000, 16), (100_000, 16)]
    budget = int(0.05 * sum(r * d * 4 for r, d in tables))
    for kind in KINDS:
        cls = HASHED_TABLES[kind]
        shares = share_budget(tables, budget, cls.minimum_bytes)
        assert sum(shares) <= budget
        assert all(s >= cls.minimum_bytes(r, d) for s, (r, d) in zip(shares, tables))
        assert shares[0] >= 3 * 16 * 4 or kind == "qr"    # a small table is kept whole (QR: its own form)
        assert shares[2] == shares[3] or shares[2] == 10_000 * 16 * 4     # the big ones share a cap
        for share, (r, d) in zip(shares, tables):     # every share builds
            cls.from_budget(nn.EmbeddingBag(r, d), share)
    with pytest.raises(ValueError, match="smallest form"):
        share_budget(tables, 100, HASHED_TABLES["qr"].minimum_bytes)


def test_init_matches_the_dense_scale_and_budgets_too_small_are_refused():
    dense = _dense()
    with torch.no_grad():
        dense.weight.mul_(0.01)
    for kind in KINDS:
        rows = HASHED_TABLES[kind].from_budget(dense, _budget(0.1)).to_dense().weight
        assert 0.002 < float(rows.detach().std()) < 0.05, kind
    for kind in KINDS:
        with pytest.raises(ValueError):
            HASHED_TABLES[kind].from_budget(dense, 40)


@pytest.mark.parametrize("kind", KINDS)
def test_a_recipe_trains_exports_and_charges_each_method(kind, tmp_path, capsys):
    from compresskit.api import run
    from compresskit.cli import main
    from compresskit.recipe import validate_recipe

    recipe = {
        "model": {"name": "dlrm", "args": {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [8]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 600, "cardinality_scale": 0.0002}},
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1,
                  "optimizer": {"name": "adagrad", "lr": 0.05}},
        "stages": [{"plugin": "fiited", "method": kind, "target_memory_ratio": 0.25}],
        "logging": {"csv": False, "plots": False, "tensorboard": "never"},
    }
    torch.manual_seed(0)
    result = run(validate_recipe(recipe, require_model=True), out_dir=str(tmp_path / "run"), raw=recipe)
    stage = result.report["stages"][0]
    assert stage["memory_ratio"] <= 0.25 + 1e-9
    tables = [m for m in result.model.modules() if isinstance(m, HASHED_TABLES[kind])]
    assert len(tables) == 26
    assert stage["payload_bytes"] + stage["index_bytes"] == sum(_stored(t) for t in tables)
    assert main(["export", str(tmp_path / "run"), "--format", "packed"]) == 0
    assert main(["check-export", str(tmp_path / "run"), str(tmp_path / "run" / "model_packed.pt")]) == 0
    assert "test rows: 0\n" in capsys.readouterr().out
