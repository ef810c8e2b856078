"""`compresskit apply` on bad recipes: one clear line naming field, value and what is allowed; exit 2; no
traceback; nothing written to the output folder."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compresskit.cli import main
from compresskit.errors import ConfigError

GOOD = """
model: {name: dlrm, args: {embedding_dim: 8}}
data: {name: synthetic-ctr, args: {num_samples: 2000}}
train: {epochs: 1, batch_size: 256, progress: false}
stages:
  - {plugin: fiited, target_memory_ratio: 0.5, chunk_size: 4}
output: {dir: OUT}
"""

CASES = [
    ("unknown plugin", GOOD.replace("plugin: fiited", "plugin: fiitd"),
     "stages[0].plugin: unknown plugin 'fiitd' (did you mean 'fiited'?)"),
    ("unknown top-level key", GOOD + "trian: {}\n", "trian: unknown key (did you mean 'train'?)"),
    ("unknown stage key", GOOD.replace("chunk_size: 4", "chunk_sise: 4"),
     "stages[0].chunk_sise: unknown key (did you mean 'chunk_size'?)"),
    ("wrong type", GOOD.replace("epochs: 1", "epochs: two"), "train.epochs: got 'two', expected an integer"),
    ("out of range", GOOD.replace("target_memory_ratio: 0.5", "target_memory_ratio: 1.5"),
     "stages[0].target_memory_ratio: got 1.5, expected a value > 0 and <= 1"),
    ("negative batch", GOOD.replace("batch_size: 256", "batch_size: 0"),
     "train.batch_size: got 0, expected a value >= 1"),
    ("bad choice", GOOD.replace("chunk_size: 4", "chunk_size: 4, schedule: cubik"),
     "stages[0].schedule: got 'cubik', expected one of cubic, linear (did you mean 'cubic'?)"),
    ("bad method", GOOD.replace("chunk_size: 4", "chunk_size: 4, method: fitted"),
     "stages[0].method: unknown fiited method 'fitted' (did you mean 'fiited'?); available: adaembed, dense, "
     "fiited, hashing, mixed_dim, qr, robe, tt_rec, uniform"),
    ("bad optimizer", GOOD.replace("progress: false", "progress: false, optimizer: {name: adamm}"),
     "train.optimizer.name: got 'adamm', expected one of sgd, adam, adamw, adagrad (did you mean 'adam'?)"),
    ("missing data file", GOOD.replace("{name: synthetic-ctr, args: {num_samples: 2000}}",
                                       "{name: movielens-100k, path: /no/such/ml-100k}"),
     "data.path: file not found: '/no/such/ml-100k'"),
    ("missing data path", GOOD.replace("{name: synthetic-ctr, args: {num_samples: 2000}}", "{name: adult}"),
     "data.path: required for dataset 'adult'"),
    ("unknown dataset", GOOD.replace("synthetic-ctr", "synthetic-ctrr"),
     "data.name: unknown dataset 'synthetic-ctrr' (did you mean 'synthetic-ctr'?)"),
    ("unknown model", GOOD.replace("name: dlrm", "name: dlrn"), "model.name: unknown model 'dlrn' (did you mean 'dlrm'?)"),
    ("unknown model arg", GOOD.replace("embedding_dim: 8", "embeding_dim: 8"),
     "model.args.embeding_dim: unknown argument for model 'dlrm' (did you mean 'embedding_dim'?)"),
    ("unknown dataset arg", GOOD.replace("num_samples: 2000", "num_sample: 2000"),
     "data.args.num_sample: unknown argument for dataset 'synthetic-ctr' (did you mean 'num_samples'?)"),
    ("yaml syntax", GOOD.replace("train: {epochs: 1,", "train: {epochs: 1,, ]"), "YAML syntax error"),
    ("stages not a list", GOOD.split("stages:")[0] + "stages: fiited\noutput: {dir: OUT}\n",
     "stages: got 'fiited', expected list of mapping"),
    ("chunk does not divide dim", GOOD.replace("chunk_size: 4", "chunk_size: 3"),
     "stages[0]: embeddings.0: embedding_dim 8 is not a multiple of chunk_size 3"),
    ("empty recipe", "", "is empty"),
    ("missing model", GOOD.replace("model: {name: dlrm, args: {embedding_dim: 8}}\n", ""),
     "model: required field is missing"),
    ("end before start", GOOD.replace("chunk_size: 4", "chunk_size: 4, start_fraction: 0.5, end_fraction: 0.2"),
     "stages[0].end_fraction: got 0.2, expected >= start_fraction (0.5)"),
]


def _run(args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "compresskit", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("name,text,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_gives_one_clear_line(tmp_path, capsys, name, text, expected):
    """In-process (the subprocess tests below cover the console entry point)."""
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("OUT", str(out)))
    assert main(["apply", str(recipe)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_missing_recipe_file(tmp_path):
    proc = _run(["apply", str(tmp_path / "nope.yaml")], tmp_path)
    assert proc.returncode == 2 and "recipe: file not found" in proc.stderr


def test_yaml_error_names_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: dlrm\n  args: [1, 2\n")
    proc = _run(["validate", str(recipe)], tmp_path)
    assert proc.returncode == 2 and "line 4" in proc.stderr


def test_validate_and_set_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.replace("OUT", str(tmp_path / "o")))
    ok = _run(["validate", str(recipe), "--set", "train.epochs=3"], tmp_path)
    assert ok.returncode == 0 and "OK (fiited)" in ok.stdout
    bad = _run(["validate", str(recipe), "--set", "stages.0.target_memory_ratio=2"], tmp_path)
    assert bad.returncode == 2 and "stages[0].target_memory_ratio: got 2" in bad.stderr
    bad = _run(["validate", str(recipe), "--set", "stages.5.x=1"], tmp_path)
    assert bad.returncode == 2 and "'5' is not an index of a list of 1" in bad.stderr


def test_plugins_lists_fields():
    proc = _run(["plugins"], ".")
    assert proc.returncode == 0
    assert "fiited (transform): FIITED" in proc.stdout
    assert "target_memory_ratio: float = 0.1" in proc.stdout


def test_recipe_strings_expand_environment_variables(tmp_path, monkeypatch, capsys):
    """${NAME:-default} and ${NAME} in a recipe read the environment (the shipped recipes find their data through
    COMPRESSKIT_DATA); an unset variable with no default is one line naming the field and the variable."""
    from compresskit.recipe import expand_environment, load_recipe

    monkeypatch.delenv("CK_TEST_DIR", raising=False)
    raw = {"data": {"path": "${CK_TEST_DIR:-fallback}/ml-100k"}, "stages": [{"dir": "${CK_TEST_DIR:-x}"}]}
    assert expand_environment(raw) == {"data": {"path": "fallback/ml-100k"}, "stages": [{"dir": "x"}]}
    monkeypatch.setenv("CK_TEST_DIR", "/data")
    assert expand_environment(raw)["data"]["path"] == "/data/ml-100k"
    monkeypatch.delenv("CK_TEST_DIR")
    with pytest.raises(ConfigError, match=r"^output.dir: environment variable CK_TEST_DIR is not set"):
        expand_environment({"output": {"dir": "${CK_TEST_DIR}/runs"}})
    with pytest.raises(ConfigError, match=r"give the value with --set stages.0.dir="):    # --set's own syntax
        expand_environment({"stages": [{"dir": "${CK_TEST_DIR}"}]})
    assert expand_environment({"train": {"epochs": "${CK_TEST_DIR:-3}"}, "note": "$${CK_TEST_DIR}"}) == \
        {"train": {"epochs": 3}, "note": "${CK_TEST_DIR}"}                # a whole reference reads as YAML
    monkeypatch.setenv("CK_TEST_DIR", "")                                  # set but empty, as a shell reads it
    assert expand_environment({"a": "${CK_TEST_DIR}", "b": "${CK_TEST_DIR:-d}"}) == {"a": "", "b": "d"}
    monkeypatch.delenv("CK_TEST_DIR")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: lenet5}\ndata: {name: digits}\noutput: {dir: '${CK_TEST_DIR:-" + str(tmp_path)
                      + "}/run'}\nstages: [{plugin: dasnet}]\n")
    assert load_recipe(str(recipe))[0].output.dir == f"{tmp_path}/run"
    data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    monkeypatch.setenv("COMPRESSKIT_DATA", str(tmp_path / "nowhere"))
    shipped = os.path.join(os.path.dirname(__file__), "..", "recipes", "fiited_dlrm_movielens.yaml")
    assert main(["validate", shipped]) == 2
    err = capsys.readouterr().err
    assert f"data.path: file not found: '{tmp_path}/nowhere/ml-100k'" in err and "grouplens.org" in err
    if os.path.isdir(os.path.join(data, "ml-100k")):
        monkeypatch.setenv("COMPRESSKIT_DATA", data)
        assert main(["validate", shipped]) == 0
