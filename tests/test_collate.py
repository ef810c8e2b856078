"""The collate hook (``data.collate``) without TorchRec: a 'pkg.module:function' collate feeds the trainer, the
evaluation and the sample input; what a collate may return; one-line errors for bad names, and for the built-in
``torchrec`` collate and ``torchrec_dlrm`` model when TorchRec is missing."""
from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
import torch

import compresskit
from compresskit.errors import ConfigError
from compresskit.data.batches import to_model_inputs

CALLS: list[int] = []   # batch sizes mapping_collate saw
INFOS: list[dict] = []


def mapping_collate(inputs: tuple[torch.Tensor, ...], label: torch.Tensor) -> dict[str, torch.Tensor]:
    """DLRM's (dense, sparse) batch as a mapping, counting calls."""
    CALLS.append(label.shape[0])
    dense, sparse = inputs
    return {"dense": dense, "sparse": sparse, "labels": label}


def info_collate(inputs: tuple[torch.Tensor, ...], label: torch.Tensor, info: dict | None = None):
    """An (inputs, label) pair as is; records the dataset info it was given."""
    INFOS.append(info)
    return inputs, label


def one_argument(batch):
    """Not a collate: takes one argument."""
    return batch


NOT_CALLABLE = 3


def _recipe(collate: str | None) -> dict:
    return {
        "model": {"name": "dlrm", "args": {"embedding_dim": 8, "bottom_mlp": [16], "top_mlp": [16]}},
        "data": {"name": "synthetic-ctr", "args": {"num_samples": 3000, "cardinality_scale": 0.0005},
                 "collate": collate},
        "train": {"epochs": 1, "batch_size": 128, "progress": False, "threads": 1},
        "stages": [{"plugin": "fiited", "target_memory_ratio": 0.3, "chunk_size": 4, "interval": 5}],
        "logging": {"csv": False, "plots": False, "tensorboard": "never"},
    }


def _run(raw: dict):
    return compresskit.run(compresskit.validate_recipe(raw, require_model=True), raw=raw)


def test_custom_mapping_collate_feeds_training_evaluation_and_the_sample():
    """A mapping collate reaches every batch (training, val, test, the sample input) and, returning DLRM's own
    inputs, gives exactly the run without a collate."""
    CALLS.clear()
    plain = _run(_recipe(None))
    assert not CALLS
    mapped = _run(_recipe(f"{__name__}:mapping_collate"))
    train_steps = mapped.report["training"]["steps"]
    # 19 training batches of 128 (2400 rows), the sample's 8 rows, then val and test (300 each) at the end
    assert CALLS[0] == compresskit.compression.SAMPLE_ROWS and len(CALLS) == 1 + train_steps + 2
    assert CALLS[1:-2] == [128] * (train_steps - 1) + [2400 - 128 * (train_steps - 1)] and CALLS[-2:] == [300, 300]
    assert mapped.report["training"]["test"] == plain.report["training"]["test"]
    assert mapped.report["stages"][0]["stored_chunks"] == plain.report["stages"][0]["stored_chunks"]
    a, b = plain.model.state_dict(), mapped.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_collate_with_an_info_argument_gets_the_dataset_info():
    INFOS.clear()
    result = _run(_recipe(f"{__name__}:info_collate"))
    assert INFOS and all(i is INFOS[0] for i in INFOS) and INFOS[0]["source"] == "synthetic-ctr"
    assert 0.5 < result.report["training"]["test"]["auc"] <= 1


def test_to_model_inputs_normalises_every_form():
    dense, sparse, label = torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0.0, 1.0])
    assert to_model_inputs(None, (dense, sparse), label) == ((dense, sparse), label)
    assert to_model_inputs(lambda i, y: ([i[1]], y * 2), (dense, sparse), label)[0] == (sparse,)
    as_mapping = to_model_inputs(lambda i, y: {"sparse": i[1], "labels": y}, (dense, sparse), label)
    assert as_mapping == ((sparse,), label)
    batch = SimpleNamespace(dense_features=dense, sparse_features="kjt", labels=label)   # torchrec's Batch
    assert to_model_inputs(lambda i, y: batch, (dense,), label) == ((dense, "kjt"), label)
    for bad, what in [({"dense": dense, "label": label}, "keys dense, label"), (dense, "returned a Tensor")]:
        with pytest.raises(ConfigError, match=rf"^data\.collate: .*{what}") as e:
            to_model_inputs(lambda i, y, out=bad: out, (dense,), label)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("collate, message", [
    ("torchrc", r"data\.collate: unknown collate 'torchrc' \(did you mean 'torchrec'\?\); available: torchrec, "
                r"'pkg\.module:function'"),
    ("no_such_module_xyz:f", r"data\.collate: cannot import module 'no_such_module_xyz' .*expected "
                             r"'pkg\.module:function'"),
    ("MOD:missing", r"data\.collate: module 'MOD' has no attribute 'missing'"),
    ("MOD:one_argument", r"data\.collate: 'MOD:one_argument' cannot be called as collate\(inputs, label\)"),
    ("MOD:NOT_CALLABLE", r"data\.collate: 'MOD:NOT_CALLABLE' cannot be called as collate\(inputs, label\)"),
    (5, r"data\.collate: got 5, expected"),
])
def test_bad_collates_are_one_line_errors_at_validation(collate, message):
    collate = collate.replace("MOD", __name__) if isinstance(collate, str) else collate
    with pytest.raises(ConfigError) as e:
        compresskit.validate_recipe(_recipe(collate), require_model=True)
    text = str(e.value)
    assert "\n" not in text and re.match(message.replace("MOD", __name__), text), text


def test_missing_torchrec_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrec", None)   # find_spec and import now see no torchrec
    install = 'pip install "compresskit[torchrec]" && pip install --no-deps torchrec==1.8.0'
    with pytest.raises(ConfigError) as e:
        compresskit.validate_recipe(_recipe("torchrec"), require_model=True)
    assert str(e.value).startswith("data.collate: needs TorchRec, which is not installed: ")
    assert install in str(e.value) and "\n" not in str(e.value)
    raw = _recipe(None)
    raw["model"] = {"name": "torchrec_dlrm", "args": {"embedding_dim": 8}}
    compresskit.validate_recipe(raw, require_model=True)   # checking the factory's signature needs no torchrec
    with pytest.raises(ConfigError) as e:
        _run(raw)
    assert str(e.value).startswith("model.name: needs TorchRec, which is not installed: ") and install in str(e.value)
