"""What a careless user or a hostile file gets (docs/failure-modes.md): one line `error: <where>: <what>`, exit 2,
before any training where the problem is knowable up front; checkpoints that are damaged, tampered or foreign are
refused; a failed write leaves the previous file intact."""
from __future__ import annotations

import gzip
import os
import pickle
import resource
import signal
import subprocess
import sys

import pytest
import torch

from compresskit import integrity
from compresskit.cli import main

SMALL = """
model: {name: dlrm, args: {embedding_dim: 8, bottom_mlp: [8], top_mlp: [8]}}
data: {name: synthetic-ctr, args: {num_samples: 600, cardinality_scale: 0.0002}}
train: {epochs: 1, batch_size: 64, progress: false, threads: 1, checkpoint_every: 4}
stages:
  - {plugin: fiited, target_memory_ratio: 0.5, chunk_size: 4, interval: 3}
output: {dir: OUT}
"""


def one_error(capsys, argv: list[str], expected: str) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one stderr line containing ``expected``."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert len(lines[0]) < 600
    return lines[0]


def write(tmp_path, text: str | bytes, name: str = "recipe.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text.replace("OUT", str(tmp_path / "out")))
    return path


# --- recipe files -----------------------------------------------------------------------------------------------

GOOD = SMALL.replace("OUT", "{out}")

RECIPE_FILES = [
    ("latin-1 byte", GOOD.encode() + b"# caf\xe9\n", "is not UTF-8 text (byte 0xe9 at line 8)"),
    ("utf-16", GOOD.encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ("gzip", gzip.compress(GOOD.encode()), "is gzip-compressed"),
    ("deep nesting", (GOOD + "x: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nests deeper than"),
    ("nesting over the limit", (GOOD + "train: " + "{a: " * 40 + "1" + "}" * 40 + "\n").encode(),
     "nested deeper than 32 levels"),
    ("too big", GOOD.replace("name: dlrm", "name: " + "a" * 2_000_000).encode(), "a recipe is at most"),
    ("alias bomb", ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh"))).encode(),
     "expands to more than 100,000 values"),
]


@pytest.mark.parametrize("name,data,expected", RECIPE_FILES, ids=[c[0] for c in RECIPE_FILES])
def test_recipe_file_problems_are_one_line(tmp_path, capsys, name, data, expected):
    path = write(tmp_path, data.replace(b"{out}", str(tmp_path / "out").encode()))
    for command in ("validate", "apply"):
        one_error(capsys, [command, str(path)], expected)
    assert not (tmp_path / "out").exists()


def test_long_values_are_shortened(tmp_path, capsys):
    path = write(tmp_path, SMALL.replace("name: dlrm", "name: " + "b" * 500_000))
    line = one_error(capsys, ["validate", str(path)], "model.name: unknown model 'bbbb")
    assert "(500,000 characters)" in line and len(line) < 400


def test_recipe_errors_come_before_torch_is_imported(tmp_path):
    """A broken recipe file is reported without importing torch or any plugin (well under a second)."""
    path = write(tmp_path, b"model: {name: dlrm\n  x: [")
    code = ("import sys; from compresskit.cli import main; rc = main(['validate', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: recipe: YAML syntax error") and proc.stderr.count("\n") == 1


# --- values that validate but used to fail or go silent in apply -------------------------------------------------

VALUES = [
    ("lr nan", ("train: {", "train: {optimizer: {lr: .nan}, "), "train.optimizer.lr: got nan, expected a finite number"),
    ("lr inf", ("train: {", "train: {optimizer: {lr: .inf}, "), "train.optimizer.lr: got inf, expected a finite"),
    ("ratio nan", ("target_memory_ratio: 0.5", "target_memory_ratio: .nan"),
     "stages[0].target_memory_ratio: got nan"),
    ("decay nan", ("chunk_size: 4", "chunk_size: 4, decay: .nan"), "stages[0].decay: got nan"),
    ("negative dim", ("embedding_dim: 8", "embedding_dim: -4"),
     "model.args.embedding_dim: got -4, expected a value >= 1 and <= 4096"),
    ("zero dim", ("embedding_dim: 8", "embedding_dim: 0"), "model.args.embedding_dim: got 0"),
    ("zero mlp", ("bottom_mlp: [8]", "bottom_mlp: [8, 0]"), "model.args.bottom_mlp[1]: got 0"),
    ("zipf", ("cardinality_scale: 0.0002", "cardinality_scale: 0.0002, zipf: -1"), "data.args.zipf: got -1"),
    ("huge data", ("num_samples: 600", "num_samples: 1000000000"), "data.args.num_samples: got 1000000000"),
    ("empty output dir", ("{dir: OUT}", "{dir: ''}"), "output.dir: got '', expected a folder name"),
    ("model name", ("name: dlrm", "name: dlrx"), "model.name: unknown model 'dlrx' (did you mean 'dlrm'?)"),
    ("model arg", ("embedding_dim: 8", "embeding_dim: 8"),
     "model.args.embeding_dim: unknown argument for model 'dlrm' (did you mean 'embedding_dim'?)"),
    ("model arg type", ("embedding_dim: 8", "embedding_dim: eight"), "model.args.embedding_dim: got 'eight'"),
]


@pytest.mark.parametrize("name,edit,expected", VALUES, ids=[c[0] for c in VALUES])
def test_bad_values_are_refused_by_validate_and_apply(tmp_path, capsys, name, edit, expected):
    text = SMALL.replace(*edit)
    assert text != SMALL
    path = write(tmp_path, text)
    one_error(capsys, ["validate", str(path)], expected)
    one_error(capsys, ["apply", str(path)], expected)
    assert not (tmp_path / "out").exists()


def test_dasnet_and_digits_bounds(tmp_path, capsys):
    recipe = ("model: {name: lenet5}\ndata: {name: digits, args: {image_size: IMG}}\ntrain: {epochs: 1}\n"
              "stages:\n  - {plugin: dasnet, sparsity: 0.5, tune_batches: [TB]}\n")
    path = write(tmp_path, recipe.replace("IMG", "1000").replace("TB", "1"))
    one_error(capsys, ["validate", str(path)], "data.args.image_size: got 1000")
    path = write(tmp_path, recipe.replace("IMG", "32").replace("TB", "100000"))
    one_error(capsys, ["validate", str(path)], "stages[0].tune_batches[0]: got 100000")


def test_set_train_on_an_analysis_recipe(tmp_path, capsys):
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "hypar_vgg_e_16.yaml")
    one_error(capsys, ["validate", recipe, "--set", "train.epochs=2"],
              "train: this recipe's stages (hypar) analyse without training")


def test_divergence_stops_with_the_step(tmp_path, capsys):
    path = write(tmp_path, SMALL.replace("train: {", "train: {optimizer: {name: sgd, lr: 1.0e+30}, "))
    one_error(capsys, ["apply", str(path)], "training diverged; lower train.optimizer.lr (now 1e+30)")


# --- output folder ----------------------------------------------------------------------------------------------

def test_output_folder_problems_come_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")

    def no_run(*args, **kwargs):
        raise AssertionError("the run started before the output folder was checked")

    monkeypatch.setattr("compresskit.api.run", no_run)
    cases = [(str(tmp_path / "afile"), "a file is in the way"),
             (str(tmp_path / "afile" / "sub"), "cannot create files there"),
             ("/proc/compresskit-out", "cannot create files there")]
    for out, expected in cases:
        path = write(tmp_path, SMALL.replace("OUT", out))
        one_error(capsys, ["apply", str(path)], expected)   # before data, model and training: run() is never called


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    """Writes beyond RLIMIT_FSIZE fail with EFBIG, like a full disk: the run stops with one line and the previous
    model.pt (and its checksum) stay as they were."""
    out = tmp_path / "out"
    path = write(tmp_path, SMALL.replace("stages:\n  - {plugin: fiited, target_memory_ratio: 0.5, chunk_size: 4, "
                                         "interval: 3}\n", "").replace("checkpoint_every: 4", "checkpoint_every: 1000"))
    assert main(["apply", str(path)]) == 0
    before = {name: (out / name).read_bytes() for name in ("model.pt", "checkpoint.pt")}
    bigger = path.read_text().replace("bottom_mlp: [8]", "bottom_mlp: [512, 512]")
    path.write_text(bigger)
    limit = max(map(len, before.values())) + 4096

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "compresskit", "apply", str(path)], capture_output=True, text=True,
                          timeout=300, preexec_fn=cap)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.pt': cannot write it" in lines[0], proc.stderr
    assert "previous version is intact" in lines[0]
    for name, data in before.items():
        assert (out / name).read_bytes() == data
        integrity.verify(out / name, required=True)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# --- checkpoints ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short FIITED run whose output folder holds checkpoint.pt, model.pt and their checksums."""
    root = tmp_path_factory.mktemp("run")
    path = root / "recipe.yaml"
    path.write_text(SMALL.replace("OUT", str(root / "out")))
    assert main(["apply", str(path)]) == 0
    return root


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = "/tmp/compresskit-evil-payload-ran"


def _resign(path) -> None:
    """Give a tampered file a fresh, valid checksum (a foreign file that passes the integrity check)."""
    (path.parent / (path.name + ".sha256")).write_text(f"{integrity.sha256_file(path)}  {path.name}\n")


def _corruptions():
    def truncate(p):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def flip(p):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))

    def foreign(obj):
        return lambda p: (torch.save(obj, p), _resign(p))

    def evil(protocol):
        def write(p):
            p.write_bytes(pickle.dumps({"step": Evil()}, protocol=protocol))
            _resign(p)
        return write

    return [
        ("truncated", truncate, "checksum mismatch"),
        ("empty", lambda p: p.write_bytes(b""), "checksum mismatch"),
        ("random bytes", lambda p: p.write_bytes(os.urandom(4096)), "checksum mismatch"),
        ("text", lambda p: p.write_text("hello"), "checksum mismatch"),
        ("one flipped byte", flip, "checksum mismatch"),
        ("checksum removed", lambda p: (p.parent / (p.name + ".sha256")).unlink(), "no checksum file"),
        ("truncated and re-signed", lambda p: (truncate(p), _resign(p)), "not a readable PyTorch file"),
        ("text and re-signed", lambda p: (p.write_text("hello"), _resign(p)), "not a readable PyTorch file"),
        ("a list", foreign([1, 2, 3]), "holds a list, not a compresskit checkpoint"),
        ("a dict without step", foreign({"model": {}}), "'step' is missing"),
        ("wrong types", foreign({"step": "x", "model": {}, "optimizer": {}, "compression": {}}), "'step' is a str"),
        ("malicious pickle", evil(2), "refused to unpickle it (Trying to load unsupported GLOBAL posix.system"),
        ("malicious pickle, protocol 4", evil(4), "refused to unpickle it"),
    ]


@pytest.mark.parametrize("name,corrupt,expected", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_corrupt_checkpoints_are_refused(finished_run, tmp_path, capsys, name, corrupt, expected):
    out = tmp_path / "out"
    out.mkdir()
    for f in ("checkpoint.pt", "checkpoint.pt.sha256"):
        (out / f).write_bytes((finished_run / "out" / f).read_bytes())
    corrupt(out / "checkpoint.pt")
    if os.path.exists(EVIL_MARK):
        os.unlink(EVIL_MARK)
    path = write(tmp_path, SMALL)
    one_error(capsys, ["apply", str(path), "--resume"], expected)
    assert not os.path.exists(EVIL_MARK), "the pickle's payload ran"
    assert not (out / "model.pt").exists()


def test_checkpoint_that_does_not_fit_the_model(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    state = torch.load(finished_run / "out" / "checkpoint.pt", weights_only=True)
    state["model"] = {k: v[:1] if v.dim() else v for k, v in state["model"].items()}
    integrity.save(out / "checkpoint.pt", state)
    one_error(capsys, ["apply", str(write(tmp_path, SMALL)), "--resume"], "does not fit this run's model")


def test_checkpoint_sidecar_survives_every_crash_point(tmp_path, monkeypatch):
    """Between any two steps of a save the file on disk verifies: the sidecar accepts old and new hashes while the
    rename is pending."""
    path = tmp_path / "c.pt"
    integrity.save(path, {"v": torch.zeros(3)})
    real_replace = os.replace

    def crash(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt   # killed just before the payload's rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        integrity.save(path, {"v": torch.ones(3)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.equal(integrity.load(path)["v"], torch.zeros(3))   # old file, accepted by the two-hash sidecar
    integrity.save(path, {"v": torch.ones(3)})
    assert torch.equal(integrity.load(path)["v"], torch.ones(3))
    assert len(integrity.accepted_hashes(path)) == 1


# --- model.checkpoint -------------------------------------------------------------------------------------------

def test_model_checkpoint_takes_a_compressed_model(finished_run, tmp_path):
    """A FIITED model.pt names stores that exist only after the stages convert the model: it loads after them,
    and the rebuilt model gives the saved model's outputs."""
    saved = finished_run / "out" / "model.pt"
    recipe = SMALL.replace("{name: dlrm,", f"{{name: dlrm, checkpoint: '{saved}',").replace(
        "train: {epochs: 1, batch_size: 64, progress: false, threads: 1, checkpoint_every: 4}\n", "")
    from compresskit.api import run
    from compresskit.recipe import load_recipe

    result = run(load_recipe(str(write(tmp_path, recipe)))[0])
    state = torch.load(saved, weights_only=True)
    mine = result.model.state_dict()
    assert mine.keys() == state.keys()
    for key in state:
        assert torch.equal(mine[key], state[key]), key


def test_model_checkpoint_problems(finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": torch.zeros(2)}, bad)
    recipe = SMALL.replace("{name: dlrm,", f"{{name: dlrm, checkpoint: '{bad}',")
    one_error(capsys, ["apply", str(write(tmp_path, recipe))], "model.checkpoint: ")
    bad.write_bytes(b"garbage")
    one_error(capsys, ["apply", str(write(tmp_path, recipe))], "refused to unpickle it")
