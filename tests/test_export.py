"""Export for serving (docs/export.md): a pruned FIITED DLRM run becomes a state dict of the original architecture,
a packed model or a torch.export program, each computing what the run's model computes; the packed tables hold
only the kept chunks and the index; the baselines' dense equivalents equal them; bad inputs are one line, exit 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from compresskit import integrity
from compresskit.api import run
from compresskit.cli import main
from compresskit.errors import ConfigError
from compresskit.export import (densify, export_program, load_packed, load_run, pack, to_state_dict)
from compresskit.plugins.fiited import FiitedEmbedding, FiitedEmbeddingBag, fiited_modules
from compresskit.plugins.fiited.mixed_dim import MixedDimEmbeddingBag
from compresskit.plugins.fiited.natural import NarrowEmbeddingBag
from compresskit.plugins.fiited.packed import PackedEmbedding, PackedEmbeddingBag
from compresskit.plugins.fiited.packed_tables import PackedTables
from compresskit.recipe import validate_recipe
from compresskit.resolve import resolve_model

RECIPE = {
    "model": {"name": "dlrm", "args": {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [8]}},
    "data": {"name": "synthetic-ctr", "args": {"num_samples": 600, "cardinality_scale": 0.0002}},
    "train": {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1,
              "optimizer": {"name": "adagrad", "lr": 0.05}},
    "stages": [{"plugin": "fiited", "target_memory_ratio": 0.3, "chunk_size": 4, "start_step": 2, "end_step": 6,
                "interval": 2}],
    "logging": {"csv": False, "plots": False, "tensorboard": "never"},
}


def _apply(tmp_path_factory, recipe: dict, name: str):
    """Run ``recipe`` into a fresh folder, as `apply` does; returns (folder, result)."""
    out = tmp_path_factory.mktemp(name) / "run"
    torch.manual_seed(0)
    return out, run(validate_recipe(recipe, require_model=True), out_dir=str(out), raw=recipe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A FIITED DLRM run (really pruned to 30% of the embedding bytes) written to a folder, as `apply` does."""
    return _apply(tmp_path_factory, RECIPE, "export")


def _batch(data, rows: int = 64) -> tuple[torch.Tensor, ...]:
    return tuple(t[:rows] for t in data.test.tensors[:-1])


def _original(recipe, data) -> nn.Module:
    """The model the recipe's model section builds, before any stage (the user's own architecture)."""
    return resolve_model(recipe.model, data.info).eval()


@torch.no_grad()
def _same(a: nn.Module, b: nn.Module, inputs: tuple) -> None:
    assert torch.allclose(a(*inputs), b(*inputs), atol=1e-6, rtol=0)


def test_load_run_rebuilds_the_pruned_model(trained):
    out, result = trained
    model, recipe, data = load_run(out)
    tables = [m for _, m in fiited_modules(model)]
    stored = sum(m.store.live for m in tables)
    assert stored < 0.35 * sum(m.num_embeddings * m.num_chunks for m in tables)      # really pruned
    assert stored == result.report["stages"][0]["stored_chunks"]
    for (_, a), (_, b) in zip(fiited_modules(model), fiited_modules(result.model)):
        assert torch.equal(a.store.counts, b.store.counts)
    _same(model, result.model.eval(), _batch(data))


def test_state_dict_loads_strict_into_the_original_architecture(trained):
    out, result = trained
    model, recipe, data = load_run(out)
    reference = [(m.row_chunk_counts(), m.chunk_size) for _, m in fiited_modules(model)]
    state = to_state_dict(model)
    original = _original(recipe, data)
    original.load_state_dict(state, strict=True)
    _same(original, result.model.eval(), _batch(data))
    for table, (counts, chunk) in zip(original.embeddings, reference):   # pruned dims are zeros
        kept = torch.arange(table.embedding_dim)[None, :] < (counts * chunk)[:, None]
        assert torch.all(table.weight[~kept] == 0) and isinstance(table, nn.EmbeddingBag)


def test_packed_loads_into_the_original_architecture_and_is_smaller(trained, capsys):
    out, result = trained
    assert main(["export", str(out), "--format", "packed"]) == 0
    printed = capsys.readouterr().out
    path, spec_file = out / "model_packed.pt", out / "model_packed.json"
    assert path.exists() and (out / "model_packed.pt.sha256").exists() and spec_file.exists()
    spec = json.loads(spec_file.read_text())
    state = integrity.load(path)
    # DLRM's 26 tables are one module, served by one op call (table-batched); the spec's bytes are those of the
    # tensors saved: values + index, nothing else of the tables
    assert list(spec["modules"]) == ["embeddings"]
    assert spec["modules"]["embeddings"]["class"].endswith(":PackedTables")
    assert len(spec["modules"]["embeddings"]["args"]["rows"]) == 26
    values = state["embeddings.values"].numel() * 4
    index = state["embeddings.counts"].numel() + state["embeddings.base"].numel() * 8    # 72 bytes a block of 64 rows
    rows = sum(spec["modules"]["embeddings"]["args"]["rows"])           # one index over all 26 tables
    assert state["embeddings.counts"].numel() == -(-rows // 8) * 8 and state["embeddings.base"].numel() == -(-rows // 64)
    assert {k for k in state if k.startswith("embeddings.")} == {"embeddings.values", "embeddings.counts",
                                                                 "embeddings.base"}
    assert spec["bytes"]["values"] == values and spec["bytes"]["index"] == index
    assert spec["bytes"]["total"] == values + index < spec["bytes"]["dense"]
    stage = result.report["stages"][0]     # the run's own accounting: payload + index of the pruned stores
    assert (values, spec["bytes"]["dense"]) == (stage["payload_bytes"], stage["dense_bytes"])
    # one index over the 26 tables' rows is smaller than 26 indexes, each padded to whole words and blocks
    padding = sum(-(-r // 8) * 8 - r + 8 * -(-r // 64) for r in spec["modules"]["embeddings"]["args"]["rows"])
    assert index < stage["index_bytes"] <= index + padding
    assert spec["bytes"]["ratio"] <= 0.3 and spec["bytes"]["ratio"] == pytest.approx(0.3, abs=0.003)
    assert f"{values:,} + index {index:,}" in printed and "model_packed.json" in printed
    # into a freshly built original model, with the Python function a serving process calls
    _, recipe, data = load_run(out)
    model = load_packed(_original(recipe, data), path)
    assert isinstance(model.embeddings, PackedTables)
    assert not list(model.embeddings.parameters())     # inference only: no autograd state
    _same(model, result.model.eval(), _batch(data))


def test_state_dict_command_and_torch_export_round_trip(trained, capsys, tmp_path):
    out, result = trained
    dense = tmp_path / "dense.pt"
    assert main(["export", str(out), "--format", "state-dict", "--out", str(dense)]) == 0
    assert "loads with strict=True" in capsys.readouterr().out
    _, recipe, data = load_run(out)
    original = _original(recipe, data)
    original.load_state_dict(integrity.load(dense), strict=True)
    _same(original, result.model.eval(), _batch(data))

    assert main(["export", str(out), "--format", "torch.export"]) == 0
    assert "batch dimension dynamic" in capsys.readouterr().out
    program = torch.export.load(str(out / "model.pt2"))
    for rows in (8, 37):   # the sample had 8 rows; the batch dimension is dynamic
        _same(program.module(), result.model.eval(), _batch(data, rows))


def test_export_program_names_what_torch_cannot_trace():
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ConfigError) as info:
        export_program(Branchy(), (torch.randn(4, 3),))
    message = str(info.value)
    assert message.startswith("torch.export: cannot export Branchy: ") and "data-dependent" in message
    assert "\n" not in message


def _one_error(capsys, argv: list[str], expected: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_bad_inputs_are_one_line(trained, capsys, tmp_path):
    out, _ = trained
    _one_error(capsys, ["export", str(tmp_path / "nope"), "--format", "packed"], "is not a folder")
    _one_error(capsys, ["export", str(out), "--format", "onnx"], "invalid choice: 'onnx'")
    _one_error(capsys, ["export", str(out)], "required: --format")
    _one_error(capsys, ["export", str(tmp_path), "--format", "packed"], "no report.json")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "report.json", copy)
    _one_error(capsys, ["export", str(copy), "--format", "state-dict"], "model.pt: file not found")
    for name in ("model.pt", "model.pt.sha256"):
        shutil.copy(out / name, copy)
    with open(copy / "model.pt", "ab") as f:
        f.write(b"\0")
    _one_error(capsys, ["export", str(copy), "--format", "state-dict"], "checksum mismatch")
    (copy / "report.json").write_text(json.dumps({"run": {}}))
    _one_error(capsys, ["export", str(copy), "--format", "state-dict"], "holds no recipe")
    _one_error(capsys, ["export", str(out), "--format", "packed", "--out", str(tmp_path / "p.json")],
               "not ending in .json")


# --- the modules, unit by unit --------------------------------------------------------------------------------

def _pruned(cls, rows: int = 45, dim: int = 12, chunk: int = 4, **kwargs):
    torch.manual_seed(1)
    table = cls(rows, dim, chunk, **kwargs)
    counts = torch.randint(0, dim // chunk + 1, (rows,))
    counts[:3] = torch.tensor([0, dim // chunk, 1])
    table.store.shrink_rows(counts)
    return table.eval()


BAG_CASES = [   # (input, offsets, per_sample_weights) as nn.EmbeddingBag takes them
    (torch.tensor([1, 2, 44, 0, 7, 7, 30]), torch.tensor([0, 2, 2, 5]), None),
    (torch.tensor([1, 2, 44, 0, 7, 7, 30]), torch.tensor([0, 2, 2, 5]), torch.rand(7)),
    (torch.randint(0, 45, (5, 3)), None, None),
    (torch.randint(0, 45, (5, 3)), None, torch.rand(5, 3)),
    (torch.tensor([], dtype=torch.long), torch.tensor([0, 0]), None),
]


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("last", [False, True])
def test_packed_bag_equals_the_fiited_bag_it_came_from(mode, last):
    table = _pruned(FiitedEmbeddingBag, mode=mode, include_last_offset=last)
    packed = table.to_packed()
    assert packed.values.shape[0] == table.store.live and not list(packed.parameters())
    assert torch.equal(packed.counts, table.store.counts) and torch.equal(packed.dense(), table.store.dense())
    assert packed.table_bytes().serving == table.table_bytes().serving
    dense = table.to_dense()
    assert isinstance(dense, nn.EmbeddingBag) and (dense.mode, dense.include_last_offset) == (mode, last)
    for ids, offsets, weights in BAG_CASES:
        if weights is not None and mode == "mean":
            continue
        if last and offsets is not None:
            offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
        expected = table(ids, offsets, weights)
        assert torch.allclose(packed(ids, offsets, weights), expected, atol=1e-6)
        assert torch.allclose(dense(ids, offsets, per_sample_weights=weights), expected, atol=1e-6)
    for bad in (-1, 45):
        with pytest.raises(IndexError):
            packed(torch.tensor([0, bad]), torch.tensor([0]))


def test_packed_embedding_lazy_and_empty_tables():
    table = _pruned(FiitedEmbedding)
    ids = torch.randint(0, 45, (4, 6))
    packed, dense = table.to_packed(), table.to_dense()
    assert isinstance(packed, PackedEmbedding) and isinstance(dense, nn.Embedding)
    assert torch.allclose(packed(ids), table(ids), atol=1e-6) and torch.allclose(dense(ids), table(ids), atol=1e-6)
    with pytest.raises(IndexError):
        packed(torch.tensor([[3, 45]]))
    # a lazy table (fixed-capacity pool, rows admitted in training): packed without its free slots
    lazy = FiitedEmbeddingBag(64, 8, 4, lazy=True, capacity=100).train()
    lazy(torch.tensor([3, 9, 40, 63]), torch.tensor([0, 2]))
    lazy.eval()
    packed = lazy.to_packed()
    assert packed.values.shape[0] == lazy.store.live == 8 < lazy.store.capacity
    bags = (torch.tensor([3, 9, 40, 1]), torch.tensor([0, 1, 3]))
    assert torch.allclose(packed(*bags), lazy(*bags), atol=1e-6)
    # every chunk pruned
    empty = _pruned(FiitedEmbeddingBag)
    empty.store.shrink_rows(torch.zeros(45, dtype=torch.long))
    assert torch.equal(empty.to_packed()(*BAG_CASES[0][:2]), torch.zeros(4, 12))


def _bag_inputs(module: nn.Module) -> list[tuple]:
    if not module.bag:
        return [(torch.randint(0, 45, (3, 5)),)]
    last = module.include_last_offset
    cases = [(ids, torch.cat([off, torch.tensor([ids.numel()])]) if last and off is not None else off, w)
             for ids, off, w in BAG_CASES]
    return [c for c in cases if c[2] is None or module.mode == "sum"]


@pytest.mark.parametrize("bag,mode,last", [(True, "sum", False), (True, "mean", True), (False, "sum", False)])
def test_baselines_to_dense_equal_their_outputs(bag, mode, last):
    torch.manual_seed(2)
    source = nn.EmbeddingBag(45, 12, mode=mode, include_last_offset=last) if bag else nn.Embedding(45, 12)
    narrow = NarrowEmbeddingBag.from_dense(source, 5)
    counts = torch.randint(0, 50, (45,)).float()
    order = torch.argsort(counts, descending=True)
    mixed = MixedDimEmbeddingBag.from_plan(source, order, [0, 4, 15, 30, 45], [12, 6, 2, 0])  # last bucket dropped
    with torch.no_grad():
        for proj in mixed.projections:
            if isinstance(proj, nn.Linear):
                proj.weight.normal_()
    for module in (narrow, mixed):
        dense = module.to_dense()
        assert type(dense) is type(source) and dense.weight.shape == (45, 12)
        if bag:
            assert (dense.mode, dense.include_last_offset) == (mode, last)
        for args in _bag_inputs(module):
            expected = module(*args)
            got = dense(*args[:2], per_sample_weights=args[2]) if bag else dense(*args)
            assert torch.allclose(got, expected, atol=1e-5), type(module).__name__
    assert torch.all(narrow.to_dense().weight[:, 5:] == 0)
    assert torch.all(mixed.to_dense().weight[order[30:]] == 0)   # the dropped bucket's rows


def test_conversion_walks_any_model_and_leaves_plain_tables_alone():
    plain = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 1))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    state = to_state_dict(plain)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert pack(plain)["modules"] == {} and pack(plain)["bytes"]["ratio"] == 1.0
    # nested and shared: a table used twice is converted once and stays shared
    table = _pruned(FiitedEmbeddingBag)
    model = nn.ModuleDict({"a": nn.ModuleList([table]), "b": table})
    spec = pack(model)
    assert set(spec["modules"]) == {"a.0", "b"} and model["a"][0] is model["b"]
    with pytest.raises(ConfigError, match="itself a table"):
        densify(_pruned(FiitedEmbeddingBag))


# --- what a serving process loads: quantized tables, checksummed programs, one-line failures ------------------

INT8_RECIPE = {**RECIPE, "stages": [{**RECIPE["stages"][0], "precision": {"storage": "int8", "cache_rows": 0.1}}]}


@pytest.fixture(scope="module")
def trained_int8(tmp_path_factory):
    """The same run with INT8 chunks and an FP32 hot-row cache."""
    return _apply(tmp_path_factory, INT8_RECIPE, "export_int8")


def _fresh_process(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); returns its stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_packed_export_keeps_the_int8_codes_and_the_cache(trained_int8, capsys):
    out, result = trained_int8
    assert main(["export", str(out), "--format", "packed"]) == 0
    assert "packed int8" in capsys.readouterr().out
    spec = json.loads((out / "model_packed.json").read_text())
    state = integrity.load(out / "model_packed.pt")
    entry = spec["modules"]["embeddings"]
    assert entry["args"]["storage"] == "int8" and entry["args"]["cached_rows"] > 0
    tables = [m for _, m in fiited_modules(result.model)]
    slots = [e[2][~torch.isin(e[0], t.cache.ids)] if t.cache is not None else e[2]
             for t, e in ((t, t.store.entries()) for t in tables)]      # a cached row's chunks: in the cache only
    # what training stored, bit for bit, the tables end to end
    assert torch.equal(state["embeddings.codes"], torch.cat([t.store.codes[s] for t, s in zip(tables, slots)]))
    assert torch.equal(state["embeddings.scales"], torch.cat([t.store.scales[s] for t, s in zip(tables, slots)]))
    assert "embeddings.values" not in state
    assert torch.equal(state["embeddings.cache_values"],
                       torch.cat([t.cache.values for t in tables if t.cache is not None]))
    # the report's bytes are the bytes of the file's table tensors
    table_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("embeddings."))
    assert spec["bytes"]["total"] == table_bytes and spec["bytes"]["cache"] > 0
    assert spec["bytes"]["total"] < 0.5 * spec["bytes"]["dense"]
    # a fresh process loads it with weights_only=True and serves what the run's model computes
    _, recipe, data = load_run(out)
    batch = _batch(data)
    torch.save({"batch": batch, "expected": result.model.eval()(*batch).detach()}, out / "probe.pt")
    printed = _fresh_process(f"""
import torch
from compresskit.export import load_packed, load_run
_, recipe, data = load_run({str(out)!r})
from compresskit.resolve import resolve_model
model = load_packed(resolve_model(recipe.model, data.info).eval(), {str(out / 'model_packed.pt')!r})
probe = torch.load({str(out / 'probe.pt')!r}, weights_only=True)
print(float((model(*probe['batch']) - probe['expected']).abs().max()))
""")
    assert float(printed.strip().splitlines()[-1]) < 1e-5


def test_torch_export_serves_the_native_op_and_reloads_in_a_fresh_process(trained_int8, capsys):
    out, result = trained_int8
    assert main(["export", str(out), "--format", "torch.export"]) == 0
    assert (out / "model.pt2.sha256").exists()
    program = torch.export.load(str(out / "model.pt2"))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "compresskit.packed_bag.default" in ops               # the custom op, not a graph of gathers
    _, recipe, data = load_run(out)
    for rows in (8, 37):
        batch = _batch(data, rows)
        torch.save({"batch": batch, "expected": result.model.eval()(*batch).detach()}, out / f"probe{rows}.pt")
    printed = _fresh_process(f"""
import torch
import compresskit
from compresskit.export import load_program
module = load_program({str(out / 'model.pt2')!r}).module()
for rows in (8, 37):
    probe = torch.load({str(out)!r} + f'/probe{{rows}}.pt', weights_only=True)
    print(float((module(*probe['batch']) - probe['expected']).abs().max()))
""")
    assert all(float(v) < 1e-5 for v in printed.split())
    assert main(["check-export", str(out), str(out / "model.pt2")]) == 0
    assert "torch.export loaded" in capsys.readouterr().out


def test_check_export_bad_files_are_one_line(trained_int8, capsys, tmp_path):
    out, _ = trained_int8
    assert main(["export", str(out), "--format", "packed"]) == 0
    assert main(["export", str(out), "--format", "torch.export"]) == 0
    capsys.readouterr()
    assert main(["check-export", str(out), str(out / "model_packed.pt")]) == 0
    assert "packed loaded" in capsys.readouterr().out
    # a file from another format version
    spec = json.loads((out / "model_packed.json").read_text())
    bad = tmp_path / "v9"
    bad.mkdir()
    shutil.copy(out / "model_packed.pt", bad / "model_packed.pt")
    shutil.copy(out / "model_packed.pt.sha256", bad / "model_packed.pt.sha256")
    (bad / "model_packed.json").write_text(json.dumps({**spec, "version": 9}))
    _one_error(capsys, ["check-export", str(out), str(bad / "model_packed.pt")], "packed format version 9")
    # batched tables written with the older 8-row index (format 2): export the run again
    (bad / "model_packed.json").write_text(json.dumps({**spec, "version": 2}))
    _one_error(capsys, ["check-export", str(out), str(bad / "model_packed.pt")],
               "serves 'embeddings' through the older 8-row index")
    # tables that do not fit the model: name the table and both shapes
    rows = spec["modules"]["embeddings"]["args"]["rows"][3]
    spec["modules"]["embeddings"]["args"]["rows"][3] = rows + 5
    (bad / "model_packed.json").write_text(json.dumps(spec))
    _one_error(capsys, ["check-export", str(out), str(bad / "model_packed.pt")],
               f"table 'embeddings.3' is {rows} x 8 in the model but {rows + 5} x 8 in the file")
    # a damaged file
    shutil.copy(out / "model.pt2", bad / "model.pt2")
    shutil.copy(out / "model.pt2.sha256", bad / "model.pt2.sha256")
    with open(bad / "model.pt2", "ab") as f:
        f.write(b"\0")
    _one_error(capsys, ["check-export", str(out), str(bad / "model.pt2")], "checksum mismatch")
    # a .pt2 calling an op nobody registered: say which package to import
    import subprocess
    import sys
    unknown = tmp_path / "unknown.pt2"
    subprocess.run([sys.executable, "-c", f"""
import torch
from compresskit.export import save_program
lib = torch.library.Library("cktest_ns", "DEF")
lib.define("foo(Tensor x) -> Tensor")
lib.impl("foo", lambda x: x * 2, "CPU")
torch.library.register_fake("cktest_ns::foo", lambda x: torch.empty_like(x), lib=lib)
class M(torch.nn.Module):
    def forward(self, x): return torch.ops.cktest_ns.foo(x) + 1
save_program(torch.export.export(M(), (torch.ones(3),)), {str(unknown)!r})
"""], check=True, timeout=300)
    _one_error(capsys, ["check-export", str(out), str(unknown)], "cktest_ns::foo, which no imported package")
    # a .pt2 written by another version of an op (its arguments renamed since): say so, not torch's generic error
    older = tmp_path / "older.pt2"
    subprocess.run([sys.executable, "-c", f"""
import torch
from compresskit.export import save_program
lib = torch.library.Library("cktest_schema", "DEF")
lib.define("bar(Tensor x, Tensor counts) -> Tensor")
lib.impl("bar", lambda x, y: x * 2, "CPU")
torch.library.register_fake("cktest_schema::bar", lambda x, y: torch.empty_like(x), lib=lib)
class M(torch.nn.Module):
    def forward(self, x): return torch.ops.cktest_schema.bar(x, x)
save_program(torch.export.export(M(), (torch.ones(3),)), {str(older)!r})
"""], check=True, timeout=300)
    lib = torch.library.Library("cktest_schema", "DEF")
    lib.define("bar(Tensor x, Tensor index) -> Tensor")
    _one_error(capsys, ["check-export", str(out), str(older)], "cktest_schema::bar with arguments the installed")


# ------------------------------------------------------------------------------------------ layout records
DASNET_RECIPE = {
    "model": {"name": "lenet5"}, "data": {"name": "digits"},
    "train": {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1,
              "optimizer": {"name": "adam", "lr": 0.002}},
    "stages": [{"plugin": "dasnet", "sparsity": 0.5, "layers": ["*"], "sparse_execution": "always",
                "tune_batches": [1, 8], "quantize": "int8"}],
    "logging": {"csv": False, "plots": False, "tensorboard": "never"},
}


@pytest.fixture(scope="module")
def dasnet_run(tmp_path_factory):
    """A DASNet run whose finalize rewrote the model: sparse twins, WTA wrappers, int8 Linears."""
    return _apply(tmp_path_factory, DASNET_RECIPE, "export_dasnet")


def test_a_dasnet_run_exports_from_its_layout_record(dasnet_run, capsys):
    out, result = dasnet_run
    layout = json.loads((out / "layout.json").read_text())
    classes = {m["class"].rsplit(":", 1)[1] for m in layout["modules"]}
    assert {"WithWTA", "SparseConv2d", "SparseLinear", "SparsePool", "Int8Linear"} <= classes
    model, _, _ = load_run(out)         # rebuilt from the record (no prepare, no timing): the run's exact model
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        for rows in (1, 8, 3):          # compact path at 1 and 8, masked dense at 3
            assert torch.equal(model(x[:rows]), result.model.eval()(x[:rows]))
    for fmt in ("state-dict", "packed", "torch.export"):
        assert main(["export", str(out), "--format", fmt]) == 0
    diffs = [float(line.rsplit(": ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "test rows" in line]
    assert len(diffs) == 3 and diffs[2] < 1e-5     # the .pt2 keeps int8 (the other two hold dequantized weights)
    # the state dict is the original LeNet-5's, int8 weights dequantized: plain tensors, weights_only, strict
    state = torch.load(out / "model_dense.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in state.values())
    lenet = resolve_model(validate_recipe(DASNET_RECIPE, require_model=True).model, {"in_channels": 1})
    lenet.load_state_dict(state, strict=True)
    assert main(["check-export", str(out), str(out / "model.pt2")]) == 0
    assert float(capsys.readouterr().out.rsplit(": ", 1)[1]) < 1e-5


def test_recorded_batchnorm_folding_rebuilds_exactly():
    from compresskit.layout import apply_layout, module_records
    from compresskit.models.resnet_cifar import resnet_cifar
    from compresskit.plugins.dasnet.convert import to_sparse_execution
    from compresskit.plugins.dasnet.fuse import PassFolded
    from compresskit.plugins.dasnet.wta import insert_wta

    torch.manual_seed(0)
    model = resnet_cifar(20, width=8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    insert_wta(model, 0.5, blocks=2)
    model.eval()
    to_sparse_execution(model, (torch.randn(4, 3, 32, 32),), batch_sizes=(1, 4), tune=False)
    records = module_records(model)
    assert sum(r.cls.endswith(":PassFolded") for r in records) > 0
    rebuilt = apply_layout(resnet_cifar(20, width=8), records, "test").eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    assert sum(isinstance(m, PassFolded) for m in rebuilt.modules()) == \
        sum(isinstance(m, PassFolded) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for rows in (1, 4, 2):
            assert torch.allclose(rebuilt(x[:rows]), model(x[:rows]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["uniform", "mixed_dim"])
def test_baseline_runs_export_in_their_natural_form(tmp_path_factory, capsys, method):
    recipe = {**RECIPE, "stages": [{"plugin": "fiited", "method": method, "target_memory_ratio": 0.3}]}
    out, result = _apply(tmp_path_factory, recipe, f"export_{method}")
    files = ("model_packed.pt", "model.pt2") if method == "uniform" else ("model_packed.pt",)   # mixed-dim traces
    for fmt in ("packed", "torch.export") if method == "uniform" else ("packed",):            # for 20 s: by hand
        assert main(["export", str(out), "--format", fmt]) == 0
    capsys.readouterr()
    spec = json.loads((out / "model_packed.json").read_text())
    cls = NarrowEmbeddingBag if method == "uniform" else MixedDimEmbeddingBag
    assert spec["modules"] and all(e["class"].endswith(cls.__name__) for e in spec["modules"].values())
    state = integrity.load(out / "model_packed.pt")
    stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("embeddings."))
    assert spec["bytes"]["total"] == stored <= 0.3 * spec["bytes"]["dense"]      # not densified on export
    for file in files:
        assert main(["check-export", str(out), str(out / file)]) == 0
        assert "test rows: 0\n" in capsys.readouterr().out


def test_export_reads_no_data_and_old_runs_still_export(trained, dasnet_run, capsys, tmp_path, monkeypatch):
    out, _ = trained
    import compresskit.export as export

    def no_data(*args, **kwargs):
        raise ConfigError("data.path", "not found")

    monkeypatch.setattr(export, "resolve_data", no_data)      # the layout rebuilds the model without the data
    assert main(["export", str(out), "--format", "state-dict", "--out", str(tmp_path / "a.pt")]) == 0
    assert "not compared with the run's model (no sample batch" in capsys.readouterr().out
    _one_error(capsys, ["export", str(out), "--format", "torch.export", "--out", str(tmp_path / "a.pt2")],
               "data.path: not found")      # the data's own error says why there is no sample batch
    monkeypatch.undo()
    # a run written before layout records: FIITED rebuilds by preparing its stages; DASNet says what to do
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "layout.json").unlink()
    assert main(["export", str(old), "--format", "packed"]) == 0
    old_dasnet = tmp_path / "old_dasnet"
    shutil.copytree(dasnet_run[0], old_dasnet)
    (old_dasnet / "layout.json").unlink()
    _one_error(capsys, ["export", str(old_dasnet), "--format", "state-dict"], "run compresskit apply again")


def test_a_layout_record_names_only_compresskit_classes(trained, capsys, tmp_path):
    out, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    layout = json.loads((bad / "layout.json").read_text())
    layout["modules"][0]["class"] = "os:system"
    (bad / "layout.json").write_text(json.dumps(layout))
    _one_error(capsys, ["export", str(bad), "--format", "state-dict"], "only compresskit's own")
    layout["modules"][0]["class"] = "compresskit.plugins.fiited.embedding:FiitedEmbeddingBag"
    layout["modules"][0]["args"]["num_embeddings"] += 3
    (bad / "layout.json").write_text(json.dumps(layout))
    _one_error(capsys, ["export", str(bad), "--format", "state-dict"], "in the model but")


def test_a_record_naming_a_moved_class_still_loads():
    """Layout records written before baselines.py was split name the old module; they rebuild the same class."""
    from compresskit.layout import recordable_class
    from compresskit.plugins.fiited.mixed_dim import MixedDimEmbeddingBag as Mixed
    from compresskit.plugins.fiited.natural import NarrowEmbeddingBag as Narrow

    assert recordable_class("compresskit.plugins.fiited.baselines:NarrowEmbeddingBag", "layout.json") is Narrow
    assert recordable_class("compresskit.plugins.fiited.baselines:MixedDimEmbeddingBag", "layout.json") is Mixed
