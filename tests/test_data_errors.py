"""Dataset loaders on bad data files: `compresskit apply` exits 2 with one line naming the file and the line of the
first bad record; no row is dropped silently; out-of-range loader arguments are refused by `compresskit validate`."""
from __future__ import annotations

import pytest

from compresskit.cli import main
from compresskit.data.adult import load_adult
from compresskit.data.movielens import load_movielens

# A tiny MovieLens-100K in the original GroupLens format (u.data tab-separated, u.user / u.item '|'-separated).
U_DATA = "1\t1\t3\t881250949\n2\t2\t4\t891717742\n3\t3\t1\t878887116\n4\t4\t5\t880606923\n5\t5\t2\t886397596\n"
U_USER = ("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n4|24|M|technician|43537\n"
          "5|33|F|other|15213\n")
GENRES_0 = "|".join(["0"] * 19)
U_ITEM = "".join(f"{i}|{title}|{date}||http://us.imdb.com/M/title-exact?{i}|{GENRES_0}\n" for i, title, date in [
    (1, "Toy Story (1995)", "01-Jan-1995"), (2, "GoldenEye (1995)", "01-Jan-1995"),
    (3, "Four Rooms (1995)", "01-Jan-1995"), (4, "Good Morning (1971)", "4-Feb-1971"),
    (5, "unknown", "")])            # an empty release date is in the real file (movie 267)
MOVIELENS = {"u.data": U_DATA, "u.user": U_USER, "u.item": U_ITEM}

ADULT_HEADER = ("age,workclass,fnlwgt,education,educational-num,marital-status,occupation,relationship,race,gender,"
                "capital-gain,capital-loss,hours-per-week,native-country,income\n")
ADULT_ROWS = ["25,Private,226802,11th,7,Never-married,Machine-op-inspct,Own-child,Black,Male,0,0,40,United-States,"
              "<=50K",
              "38,Private,89814,HS-grad,9,Married-civ-spouse,Farming-fishing,Husband,White,Male,0,0,50,United-States,"
              "<=50K",
              "28,Local-gov,336951,Assoc-acdm,12,Married-civ-spouse,Protective-serv,Husband,White,Male,0,0,40,"
              "United-States,>50K",
              "44,Private,160323,Some-college,10,Married-civ-spouse,Machine-op-inspct,Husband,Black,Male,7688,0,40,"
              "United-States,>50K",
              "18,?,103497,Some-college,10,Never-married,?,Own-child,White,Female,0,0,30,United-States,<=50K"]
ADULT = ADULT_HEADER + "\n".join(ADULT_ROWS) + "\n"

CRITEO_ROW = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26)
CRITEO = "\n".join([CRITEO_ROW, CRITEO_ROW.replace("1", "0", 1)] * 3) + "\n"


def _replace_line(text: str, lineno: int, new: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


def _run_apply(tmp_path, dataset: str, files: dict[str, str], capsys) -> tuple[int, str]:
    """Write ``files`` into a data folder, run `compresskit apply` on a tiny recipe in-process: (rc, stderr)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, text in files.items():
        (data_dir / name).write_text(text, encoding="latin-1")
    path = data_dir if dataset == "movielens-100k" else data_dir / next(iter(files))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: dlrm, args: {{embedding_dim: 4, bottom_mlp: [8], top_mlp: [8]}}}}\n"
                      f"data: {{name: {dataset}, path: '{path}'}}\n"
                      f"train: {{epochs: 1, batch_size: 4, progress: false}}\n"
                      f"output: {{dir: '{tmp_path / 'out'}'}}\n")
    capsys.readouterr()
    rc = main(["apply", str(recipe)])
    return rc, capsys.readouterr().err


BAD_MOVIELENS = [
    ("space-separated u.data", "u.data", _replace_line(U_DATA, 3, "3 3 1 878887116"),
     "u.data line 3: expected 4 tab-separated fields (user id, item id, rating, timestamp), got 1 "
     "('3 3 1 878887116'); MovieLens-100K's u.data is tab-separated"),
    ("short u.data row", "u.data", _replace_line(U_DATA, 2, "2\t2\t4"), "u.data line 2: expected 4 tab-separated"),
    ("first of two bad rows", "u.data", _replace_line(_replace_line(U_DATA, 4, "4\t4\t9\t0"), 2, "2\t2\tx\t0"),
     "u.data line 2: rating is 'x'; expected an integer from 1 to 5"),
    ("rating out of range", "u.data", _replace_line(U_DATA, 5, "5\t5\t6\t886397596"),
     "u.data line 5: rating is '6'; expected an integer from 1 to 5"),
    ("unknown user", "u.data", _replace_line(U_DATA, 2, "99\t2\t4\t891717742"),
     "u.data line 2: user id '99' is not in u.user; expected one of the 5 user ids listed in u.user"),
    ("empty user id", "u.data", _replace_line(U_DATA, 1, "\t1\t3\t881250949"), "u.data line 1: user id is empty"),
    ("unknown item", "u.data", _replace_line(U_DATA, 4, "4\t1682\t5\t880606923"),
     "u.data line 4: item id '1682' is not in u.item"),
    ("empty u.data", "u.data", "\n\n", "u.data: empty file; expected one rating per line"),
    ("non-numeric age", "u.user", _replace_line(U_USER, 3, "3|twenty|M|writer|32067"),
     "u.user line 3: age is 'twenty'; expected an integer >= 0"),
    ("duplicate user", "u.user", _replace_line(U_USER, 4, "2|24|M|technician|43537"),
     "u.user line 4: user id '2' repeats line 2; expected each user id once"),
    ("short u.user row", "u.user", _replace_line(U_USER, 5, "5|33|F"),
     "u.user line 5: expected 5 '|'-separated fields (user id, age, gender, occupation, zip code), got 3"),
    ("truncated u.item", "u.item", _replace_line(U_ITEM, 2, "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1"),
     "u.item line 2: expected 24 '|'-separated fields (movie id, title, release date, video release date, "
     "IMDb URL, 19 genre flags), got 8"),
    ("bad release date", "u.item", _replace_line(U_ITEM, 3, U_ITEM.splitlines()[2].replace("01-Jan-1995", "1995?")),
     "u.item line 3: release date is '1995?'; expected a date like 01-Jan-1995 or an empty field"),
    ("duplicate item", "u.item", _replace_line(U_ITEM, 5, U_ITEM.splitlines()[0]),
     "u.item line 5: item id '1' repeats line 1"),
    ("bad genre flag", "u.item", _replace_line(U_ITEM, 1, U_ITEM.splitlines()[0][:-1] + "x"),
     "u.item line 1: genre flag Western is 'x'; expected an integer from 0 to 1"),
]

BAD_ADULT = [
    ("short row", _replace_line(ADULT, 3, "38,Private,89814"),
     "line 3: expected 15 comma-separated fields (age, workclass, ..., income), got 3 ('38,Private,89814')"),
    ("non-numeric age", _replace_line(ADULT, 2, ADULT_ROWS[0].replace("25,", "twenty-five,", 1)),
     "line 2: age is 'twenty-five'; expected a number"),
    ("negative money", _replace_line(ADULT, 5, ADULT_ROWS[3].replace("7688", "-7688")),
     "line 5: capital-gain is '-7688'; expected a number >= 0"),
    ("unknown income", _replace_line(ADULT, 6, ADULT_ROWS[4].replace("<=50K", "50K")),
     "line 6: income is '50K'; expected <=50K or >50K"),
    ("header only", ADULT_HEADER, "adult.csv: no data rows"),
    ("empty", "  \n", "adult.csv: empty file"),
]

BAD_CRITEO = [
    ("label", _replace_line(CRITEO, 2, CRITEO_ROW.replace("1", "2", 1)), "line 2: label is '2'; expected 0 or 1"),
    ("dense", _replace_line(CRITEO, 3, CRITEO_ROW.replace("\t3\t3\t3\t3\t3", "\t3\t3\t3\t3\tabc", 1)),
     "line 3: I5 is 'abc'; expected a number"),
    ("field count", _replace_line(CRITEO, 4, "1\t2\t3"),
     "line 4: expected 40 tab-separated fields (label, I1..I13, C1..C26), got 3"),
]


def _assert_one_line(rc: int, err: str, expected: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: data: "), err
    assert expected in err, err


@pytest.mark.parametrize("case,file,text,expected", BAD_MOVIELENS, ids=[c[0] for c in BAD_MOVIELENS])
def test_bad_movielens_names_file_and_line(tmp_path, capsys, case, file, text, expected):
    rc, err = _run_apply(tmp_path, "movielens-100k", {**MOVIELENS, file: text}, capsys)
    _assert_one_line(rc, err, expected)
    assert str(tmp_path / "data" / file) in err


@pytest.mark.parametrize("case,text,expected", BAD_ADULT, ids=[c[0] for c in BAD_ADULT])
def test_bad_adult_names_line(tmp_path, capsys, case, text, expected):
    rc, err = _run_apply(tmp_path, "adult", {"adult.csv": text}, capsys)
    _assert_one_line(rc, err, f"{tmp_path / 'data' / 'adult.csv'}")
    assert expected in err, err


@pytest.mark.parametrize("case,text,expected", BAD_CRITEO, ids=[c[0] for c in BAD_CRITEO])
def test_bad_criteo_names_line_and_field(tmp_path, capsys, case, text, expected):
    rc, err = _run_apply(tmp_path, "criteo", {"train.txt": text}, capsys)
    _assert_one_line(rc, err, f"{tmp_path / 'data' / 'train.txt'} {expected}")


def _rows(bundle) -> int:
    return sum(len(s) for s in (bundle.train, bundle.val, bundle.test) if s is not None)


def test_good_small_files_keep_every_row(tmp_path):
    for name, text in MOVIELENS.items():
        (tmp_path / name).write_text(text)
    assert _rows(load_movielens(str(tmp_path))) == 5
    (tmp_path / "adult.csv").write_text(ADULT + "\n  \n")            # trailing blank lines are not rows
    assert _rows(load_adult(str(tmp_path / "adult.csv"))) == 5
    (tmp_path / "adult.data").write_text("\n".join(r.replace(",", ", ") for r in ADULT_ROWS) + "\n")   # headerless
    assert _rows(load_adult(str(tmp_path / "adult.data"))) == 5


def test_adult_short_row_is_an_error_not_dropped(tmp_path):
    from compresskit.errors import DataError

    path = tmp_path / "adult.csv"
    path.write_text(ADULT + "30,Private,100000\n")
    with pytest.raises(DataError, match=r"adult\.csv line 7: expected 15 comma-separated fields"):
        load_adult(str(path))


BAD_ARGS = [
    ("synthetic-ctr", "zipf: -1", "data.args.zipf: got -1"),
    ("synthetic-ctr", "zipf: 11", "data.args.zipf: got 11"),
    ("synthetic-ctr", "num_samples: 5", "data.args.num_samples: got 5, expected a value >= 10 and <= 10000000"),
    ("synthetic-ctr", "cardinality_scale: 0", "data.args.cardinality_scale: got 0"),
    ("digits", "image_size: 1000", "data.args.image_size: got 1000, expected a value >= 8 and <= 256"),
    ("digits", "channels: 5", "data.args.channels: got 5, expected a value >= 1 and <= 4"),
    ("criteo", "max_rows: 0", "data.args.max_rows: got 0, expected a value >= 1"),
    ("criteo", "min_count: 0", "data.args.min_count: got 0, expected a value >= 1"),
    ("movielens-100k", "min_rating_positive: 6",
     "data.args.min_rating_positive: got 6, expected a value >= 1 and <= 5"),
]


@pytest.mark.parametrize("dataset,arg,expected", BAD_ARGS, ids=[f"{d}-{a}" for d, a, _ in BAD_ARGS])
def test_validate_refuses_out_of_range_loader_args(tmp_path, capsys, dataset, arg, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: dlrm}}\ndata: {{name: {dataset}, path: '{tmp_path}', args: {{{arg}}}}}\n")
    rc = main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {expected}"), err


def test_real_files_load_unchanged(movielens_path, adult_path):
    """The real GroupLens and UCI files have no bad record: every row is kept."""
    assert _rows(load_movielens(movielens_path)) == 100_000
    assert _rows(load_adult(adult_path)) == 48_842


BAD_USER_DATA = [
    ("libfm", "x.libfm", "1 0:1 4:1\n0 1:1 5:x\n", "x.libfm line 2: token '5:x' is not feature:value"),
    ("libfm fields", "x.libfm", "1 0:1 4:1\n0 1:1\n", "x.libfm line 2: rows hold 1 to 2 features"),
    ("csv", "c.csv", "label,user\n1,a\n2,b\n", "c.csv line 3: label is '2'; expected 0/1 or -1/+1"),
    ("csv header", "c.csv", "clicked,user\n1,a\n", "c.csv: has no column 'label' (data.args.label)"),
]


@pytest.mark.parametrize("dataset,file,text,expected", BAD_USER_DATA, ids=[c[0] for c in BAD_USER_DATA])
def test_bad_user_data_is_one_line_naming_file_and_line(tmp_path, capsys, dataset, file, text, expected):
    rc, err = _run_apply(tmp_path, dataset.split()[0], {file: text}, capsys)
    _assert_one_line(rc, err, expected)
