"""A user's own data: the csv, parquet and libfm loaders (fields, multi-hot bags, weights, given splits, errors that
name the file and line), multi-hot bags through the tables (plain, packed and table-batched, sharded over ranks) and
the shipped recipes that train, prune and export on them."""
from __future__ import annotations

import copy
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compresskit.data import load_dataset
from compresskit.errors import ConfigError, DataError
from compresskit.models.tables import EmbeddingTables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, path, **args):
    return load_dataset(SimpleNamespace(name=name, path=str(path), args=args), seed=0)


def bag_reference(tables, sparse, weights):
    """Each feature's pooled vectors, one sample and one id at a time."""
    out = []
    for f, table in enumerate(tables):
        rows = []
        for b in range(sparse.shape[0]):
            ids = sparse[b, f].reshape(-1)
            w = torch.ones(ids.shape) if weights is None else weights[b, f].reshape(-1)
            keep = ids >= 0
            rows.append((table.weight[ids[keep]] * w[keep, None]).sum(0))
        out.append(torch.stack(rows))
    return out


def all_rows(data) -> tuple[torch.Tensor, ...]:
    """Every split's rows, concatenated tensor by tensor."""
    parts = [d.tensors for d in (data.train, data.val, data.test) if d is not None]
    return tuple(torch.cat(ts) for ts in zip(*parts))


# ------------------------------------------------------------------------------------------ libfm
def write(path, text: str):
    path.write_text(text)
    return path


def test_libfm_fields_by_position_and_given_splits(tmp_path):
    """Frappe's layout: global feature indices, one per field in order, train / validation / test files."""
    write(tmp_path / "d.train.libfm", "1 0:1 10:1 20:1\n-1 1:1 11:1 20:1\n1 0:1 12:1 21:1\n-1 2:1 10:1 21:1\n")
    write(tmp_path / "d.validation.libfm", "1 1:1 10:1 22:1\n")
    write(tmp_path / "d.test.libfm", "-1 0:1 13:1 20:1\n1 2:1 11:1 21:1\n")
    data = load("libfm", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 2)
    assert data.info["cardinalities"] == [4, 5, 4] and data.info["num_dense"] == 0
    assert data.info["fields_from"] == "position"
    dense, sparse, label = data.train.tensors
    assert dense.shape == (4, 0) and sparse.shape == (4, 3)
    assert label.tolist() == [1, 0, 1, 0]
    # one vocabulary a field over every split: feature 0 is one id in train and test, feature 13 its own
    assert sparse[0, 0] == sparse[2, 0] == data.test.tensors[1][0, 0]
    assert int(data.test.tensors[1][0, 1]) not in sparse[:, 1].tolist()


def test_libfm_given_fields_make_weighted_bags(tmp_path):
    """``fields`` cuts feature indices into fields: a row may hold several features of a field (a bag) or none;
    values other than 1 become per-id weights."""
    data = load("libfm", write(tmp_path / "x.libsvm", "1 0:1 1:0.5 5:2\n0 6:1\n1 2:1 7:3 8:1\n"), fields=[0, 5])
    assert data.info["multi_hot"] and data.info["weighted"] and data.info["cardinalities"] == [4, 5]
    dense, sparse, weights, label = all_rows(data)
    assert sparse.shape == (3, 2, 2) and weights.shape == sparse.shape
    bags = sorted((label[r].item(), f, tuple(sorted(zip(sparse[r, f][sparse[r, f] >= 0].tolist(),
                                                         weights[r, f][sparse[r, f] >= 0].tolist()))))
                  for r in range(3) for f in range(2))
    # ids by first appearance within each field: field 0 has 0, 1, 2 -> 1, 2, 3; field 1 has 5, 6, 7, 8 -> 1..4
    assert bags == [(0.0, 0, ()), (0.0, 1, ((2, 1.0),)), (1.0, 0, ((1, 1.0), (2, 0.5))), (1.0, 0, ((3, 1.0),)),
                    (1.0, 1, ((1, 2.0),)), (1.0, 1, ((3, 3.0), (4, 1.0)))]


def test_libffm_tokens_name_their_fields(tmp_path):
    file = write(tmp_path / "x.ffm", "1 0:5:1 2:9:1\n0 0:6:1 2:9:1\n1 0:5:1 1:4:1 2:8:1\n")
    data = load("libfm", file)
    assert data.info["fields_from"] == "libFFM field numbers" and data.info["cardinalities"] == [3, 2, 3]


@pytest.mark.parametrize("text,args,match", [
    ("1 0:1 4:1\n0 1:x\n", {}, r"x\.libfm line 2: token '1:x' is not feature:value"),
    ("1 0:1 4:1\n0 1:1\n", {}, r"line 2: rows hold 1 to 2 features.*data\.args\.fields"),
    ("1 0:1\n2 1:1\n", {}, r"line 2: label is '2'; expected 0/1 or -1/\+1.*positive_above"),
    ("1 0:1\n0 0:1:1\n", {}, r"line 2: mixes feature:value and field:feature:value tokens \(the other form is at "
                            r".*line 1\)"),
    ("1 3:1\n0 7:1\n", {"fields": [5]}, r"line 1: feature 3 is below the first field's start 5"),
    ("1 0:1\n", {"fields": [5, 5]}, r"fields is '\[5, 5\]'; expected .* strictly ascending"),
])
def test_libfm_errors_name_file_and_line(tmp_path, text, args, match):
    with pytest.raises(DataError, match=match):
        load("libfm", write(tmp_path / "x.libfm", text), **args)


def test_numeric_labels_binarised_by_threshold(tmp_path):
    data = load("libfm", write(tmp_path / "r.libfm", "4.5 0:1\n2 1:1\n3.5 0:1\n5 1:1\n1 0:1\n"), positive_above=3.5)
    assert sorted(all_rows(data)[-1].tolist()) == [0, 0, 0, 1, 1]


def test_a_folder_of_unrelated_files_is_one_line(tmp_path):
    write(tmp_path / "a.libfm", "1 0:1\n")
    write(tmp_path / "b.libfm", "1 0:1\n")
    with pytest.raises(DataError, match=r"holds a\.libfm, b\.libfm; expected one libfm file, or train and test"):
        load("libfm", tmp_path)


# ------------------------------------------------------------------------------------------ csv / parquet
CSV = ("clicked,user,tags,price,city\n"
       "1,u1,a|b,3.5,x\n"
       "0,u2,b,,y\n"
       "1,u1,,10,x\n"
       "0,u3,a|c|b,1,\n")


def test_csv_columns_multi_hot_and_missing_dense(tmp_path):
    file = write(tmp_path / "c.csv", CSV)
    data = load("csv", file, label="clicked", dense=["price"], multi_hot=["tags"])
    assert data.info["sparse_names"] == ["user", "tags", "city"] and data.info["cardinalities"] == [4, 4, 3]
    dense, sparse, label = all_rows(data)
    assert sparse.shape == (4, 3, 3) and dense.shape == (4, 1)
    # the missing price got the mean: it sits at 0 after standardising, as the mean does
    assert sorted(dense[:, 0].tolist())[2] == pytest.approx(0.0, abs=1e-6)
    bags = sorted(len([i for i in row[1] if i >= 0]) for row in sparse)
    assert bags == [0, 1, 2, 3]                   # the empty tags cell is an empty bag
    # a missing single-valued cell is the out-of-vocabulary id 0
    assert sorted(int(row[2][0]) for row in sparse) == [0, 1, 1, 2]


def test_csv_text_labels_headerless_files_and_tabs(tmp_path):
    file = write(tmp_path / "t.tsv", "yes\tu1\t3\nno\tu2\t4\nyes\tu3\t5\n")
    data = load("csv", file, label="y", columns=["y", "user", "n"], delimiter="\t", dense=["n"], positive="yes")
    assert sorted(all_rows(data)[-1].tolist()) == [0, 1, 1] and data.info["cardinalities"] == [4]


@pytest.mark.parametrize("text,args,error,match", [
    (CSV, {"label": "click"}, DataError, r"c\.csv: has no column 'click' \(data\.args\.label\); its columns are "
                                         r"'clicked, user"),
    (CSV.replace("0,u2,b,,y", "0,u2,b,y"), {"label": "clicked"}, DataError,
     r"c\.csv line 3: expected 5 comma-separated fields"),
    (CSV, {"label": "clicked", "dense": ["user"]}, DataError, r"line 2: user is 'u1'; expected a number"),
    (CSV, {"label": "clicked", "multi_hot": ["price"], "dense": ["price"]}, ConfigError,
     r"data\.args\.multi_hot: 'price' is not a categorical column"),
    (CSV, {"label": "user"}, DataError, r"line 2: user is 'u1'; expected 0/1 or -1/\+1, or set data\.args\.positive"),
])
def test_csv_errors_name_the_column_file_and_line(tmp_path, text, args, error, match):
    with pytest.raises(error, match=match):
        load("csv", write(tmp_path / "c.csv", text), **args)


def test_parquet_list_columns_are_bags(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet loader needs pyarrow (the 'parquet' extra)")
    import pyarrow.parquet as pq

    table = pa.table({"label": [1, 0, 1, 0], "user": ["a", "b", "a", "c"], "tags": [["x", "y"], [], ["y"], None],
                      "age": [20.0, None, 40.0, 30.0]})
    pq.write_table(table, tmp_path / "p.parquet")
    data = load("parquet", tmp_path / "p.parquet", dense=["age"])
    sparse = all_rows(data)[1]
    assert sparse.shape == (4, 2, 2) and data.info["cardinalities"] == [4, 3]
    parts = tmp_path / "parts"                 # a folder of parts (no split names) is one table
    parts.mkdir()
    pq.write_table(table.slice(0, 2), parts / "part-0.parquet")
    pq.write_table(table.slice(2), parts / "part-1.parquet")
    assert torch.equal(all_rows(load("parquet", parts, dense=["age"]))[1].sort(0).values, sparse.sort(0).values)
    bad = pa.table({"label": [1, 0, 7], "user": ["a", "b", "c"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet row 3: label is '7'"):
        load("parquet", tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------------ bags through tables
def _bags(batch=9, features=3, width=4, rows=(7, 11, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, r, (batch, width), generator=g) for r in rows], 1)
    sparse[torch.rand(sparse.shape, generator=g) < 0.4] = -1
    sparse[0, 0] = -1                                           # an empty bag
    return sparse, torch.rand(sparse.shape, generator=g)


def test_multi_hot_bags_equal_the_one_at_a_time_reference():
    torch.manual_seed(0)
    tables = EmbeddingTables(nn.EmbeddingBag(r, 6, mode="sum") for r in (7, 11, 5))
    sparse, weights = _bags()
    for w in (None, weights):
        got = tables(sparse, w)
        for g, e in zip(got, bag_reference(tables, sparse, w)):
            assert torch.allclose(g, e, atol=1e-6)
    with pytest.raises(ValueError, match=r"weights of the ids' shape"):
        tables(sparse, weights[:, :2])


@pytest.mark.parametrize("storage,cache", [("fp32", 0.0), ("int8", 0.2)])
def test_packed_and_table_batched_serve_multi_hot_bags(storage, cache):
    """The packed tables and the one-op-call collection serve bags and weights as the trained tables do."""
    from test_fiited_serving import _trained

    trained = EmbeddingTables(_trained(storage, r, dim=8, cache_rows=cache, seed=i) for i, r in enumerate((7, 11, 5)))
    packed = EmbeddingTables(t.to_packed() for t in trained)
    batched = packed.to_batched()
    assert batched is not None
    sparse, weights = _bags()
    with torch.no_grad():
        for w in (None, weights):
            expected = trained(sparse, w)
            for got in (packed(sparse, w), batched(sparse, w)):
                for g, e in zip(got, expected):
                    assert torch.allclose(g, e, atol=1e-5)
            flat = sparse[:, :, 0].clamp(min=0)                        # single-valued, weighted
            wf = None if w is None else w[:, :, 0]
            for g, e in zip(batched(flat, wf), trained(flat, wf)):
                assert torch.allclose(g, e, atol=1e-5)
    bad = sparse.clone()
    bad[3, 2, 1] = 5
    with pytest.raises(IndexError, match="table 2 of 5 rows"):
        batched(bad)


def _sharded_bags(rank: int, world: int) -> float:
    """On each rank: the sharded tables' pooled vectors and gradients against the one-process collection."""
    import torch.distributed as dist

    from compresskit.distributed.collective import Collective
    from compresskit.distributed.sharding import ShardedTables

    torch.manual_seed(0)
    tables = EmbeddingTables(nn.EmbeddingBag(r, 6, mode="sum") for r in (7, 11, 5))
    sparse, weights = _bags(batch=10)
    expected = tables(sparse, weights)
    sum(((e * (i + 1)) ** 2).sum() for i, e in enumerate(expected)).backward()
    coll = Collective(rank, world, dist.group.WORLD, dist.group.WORLD, "gloo")
    sharded = ShardedTables(copy.deepcopy(tables), [0, 1, 0], coll)
    rows = torch.tensor_split(torch.arange(10), world)[rank]
    got = sharded(sparse[rows], weights[rows])
    err = max(float((g - e[rows]).abs().max()) for g, e in zip(got, expected))
    sum(((g * (i + 1)) ** 2).sum() for i, g in enumerate(got)).backward()
    for name, table in sharded.items():          # each rank's loss is its share: gradients divided by the ranks
        err = max(err, float((table.weight.grad * world - tables[int(name)].weight.grad).abs().max()))
    return err


def test_multi_hot_bags_through_the_sharded_exchange():
    from compresskit.distributed.local import run_local

    assert max(run_local(_sharded_bags, 2, timeout=60)) < 1e-5


def test_the_csv_recipe_with_multi_hot_bags_on_two_ranks_equals_one_process(tmp_path):
    """compresskit's DLRM on the CSV sample (a multi-hot ``tags`` column, padded bags) with FIITED: 2 ranks give the
    one-process model, loss curve, metrics and kept chunks, and send the bytes the communication model says for
    jagged bags (a length and the ids a bag holds, never its padding)."""
    from test_distributed import csv_recipe, two_ranks_against_one

    two_ranks_against_one(tmp_path, csv_recipe())


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", ["fiited_dlrm_csv.yaml", "fiited_dlrm_libfm.yaml"])
def test_user_data_recipes_train_prune_and_export(tmp_path, recipe):
    """The shipped recipes, run from a fresh folder holding the sample data, train, prune to their budget and
    export a packed model whose outputs equal the run's."""
    import json

    from compresskit.cli import main
    from compresskit.export import export_run

    shutil.copytree(os.path.join(ROOT, "examples", "data"), tmp_path / "examples" / "data")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(["apply", os.path.join(ROOT, "recipes", recipe), "--set", "train.epochs=1", "--set",
                   "train.progress=false", "--set", "output.dir=run"])
        assert rc == 0
        report = json.load(open("run/report.json"))
        out = export_run("run", "packed")
    finally:
        os.chdir(cwd)
    assert report["stages"][0]["memory_ratio"] <= 0.1
    assert report["training"]["test"]["auc"] > 0.6
    assert out["max_abs_diff"] == 0


# ------------------------------------------------------------------------------------------ edges of user files
@pytest.mark.parametrize("files,match", [
    ({"train_test.libfm": "1 0:1\n"}, r"train_test\.libfm: the name holds the words of train and test"),
    ({"x.val.libfm": "1 0:1\n0 1:1\n"}, r"holds val: x\.val\.libfm, but given splits need a train and a test file"),
    ({"a.train.libfm": "1 0:1\n", "b.libfm": "1 0:1\n"}, r"holds train: a\.train\.libfm, but given splits need"),
])
def test_ambiguous_or_incomplete_split_folders_are_one_line(tmp_path, files, match):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(DataError, match=match):
        load("libfm", tmp_path)


def test_too_few_rows_for_a_split_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"2 rows leave 2 for training and 0 for testing"):
        load("csv", write(tmp_path / "c.csv", "label,user\n1,a\n0,b\n"))


def test_csv_bom_long_cells_and_no_dense_columns(tmp_path):
    import warnings

    history = "|".join(f"item{i}" for i in range(30000))            # one cell of about 270k characters
    rows = "".join(f"{i % 2},u{i},{history if i == 0 else 'item1'}\n" for i in range(20))
    file = tmp_path / "c.csv"
    file.write_bytes(("\ufefflabel,user,seen\n" + rows).encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # no dense column: no std() warning
        data = load("csv", file, multi_hot=["seen"])
    assert data.info["sparse_names"] == ["user", "seen"] and data.info["cardinalities"][1] == 30001
    assert all_rows(data)[1].shape == (20, 2, 30000)
    with pytest.raises(DataError, match=r"no label equals data\.args\.positive \('yes'\); its first values are '0, 1'"):
        load("csv", file, multi_hot=["seen"], positive="yes")


def test_non_ascii_digits_are_a_bad_token(tmp_path):
    with pytest.raises(DataError, match=r"x\.libfm line 2: token '1²:1' is not feature:value"):
        load("libfm", write(tmp_path / "x.libfm", "1 0:1\n0 1²:1\n"))


def test_parquet_split_folders_and_missing_bags(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet loader needs pyarrow (the 'parquet' extra)")
    import pyarrow.parquet as pq

    for split, n in (("train", 8), ("test", 3)):       # Spark writes each split as a folder of parts
        (tmp_path / f"{split}.parquet").mkdir()
        pq.write_table(pa.table({"label": [i % 2 for i in range(n)], "tags": [["a"], None] * (n // 2) + [["b"]] * (n % 2)}),
                       tmp_path / f"{split}.parquet" / "part-0.parquet")
    data = load("parquet", tmp_path)
    assert (len(data.train), data.val, len(data.test)) == (8, None, 3)
    sparse = all_rows(data)[1]
    assert int((sparse[:, 0] >= 0).sum(1).eq(0).sum()) == 5     # a missing list is an empty bag, not row 0


def test_compressed_files_read_as_they_are(tmp_path):
    import gzip

    text = "1 0:1 10:1\n-1 1:1 11:1\n1 0:1 12:1\n-1 2:1 10:1\n1 1:1 11:1\n"
    plain = all_rows(load("libfm", write(tmp_path / "x.libfm", text)))
    (tmp_path / "z").mkdir()
    with gzip.open(tmp_path / "z" / "x.libfm.gz", "wt") as f:
        f.write(text)
    assert all(torch.equal(a, b) for a, b in zip(all_rows(load("libfm", tmp_path / "z" / "x.libfm.gz")), plain))
    (tmp_path / "z" / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad\.csv\.gz: cannot read it"):
        load("csv", tmp_path / "z" / "bad.csv.gz")
