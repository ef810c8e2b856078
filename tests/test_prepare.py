"""compresskit.prepare on a user's own training loop: the same result as ``apply`` with the equivalent recipe
(FIITED and DASNet, AdamW, a DataLoader, gradient accumulation), exact resume from the handle's state, and clear
errors when the loop is wired wrong."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import compresskit
from compresskit.data import DataBundle
from compresskit.plugins.dasnet import DasnetConfig
from compresskit.plugins.fiited import FiitedConfig, fiited_modules
from compresskit.recipe import DataConfig, ModelConfig
from compresskit.resolve import resolve_data, resolve_model
from compresskit.schema import build
from compresskit.train import epoch_order

BATCH, ACCUMULATE, LR, DECAY = 85, 2, 0.01, 0.01   # odd micro-batch counts: a short last group


def _bundle_and_model(kind: str) -> tuple[DataBundle, torch.nn.Module]:
    if kind == "fiited":
        data = resolve_data(build(DataConfig, {"name": "synthetic-ctr", "args": {"num_samples": 3000,
                                                                               "cardinality_scale": 0.0005}}))
        spec = {"name": "dlrm", "args": {"embedding_dim": 16, "bottom_mlp": [16], "top_mlp": [16]}}
    else:
        data = resolve_data(build(DataConfig, {"name": "digits"}))
        spec = {"name": "lenet5"}
    torch.manual_seed(0)
    return data, resolve_model(build(ModelConfig, spec), data.info)


def _stage(kind: str) -> dict:
    if kind == "fiited":
        return {"plugin": "fiited", "target_memory_ratio": 0.3, "chunk_size": 4, "interval": 5}
    return {"plugin": "dasnet", "sparsity": 0.5}


def _recipe(kind: str, data: DataBundle) -> dict:
    return {"train": {"epochs": 1, "batch_size": BATCH, "accumulate_grad_batches": ACCUMULATE, "progress": False,
                      "optimizer": {"name": "adamw", "lr": LR, "weight_decay": DECAY}},
            "stages": [_stage(kind)]}


def _loss(kind: str):
    if kind == "fiited":
        bce = torch.nn.BCEWithLogitsLoss()
        return lambda out, y: bce(out, y.float())
    return torch.nn.CrossEntropyLoss()


def _hand_loop(model, data: DataBundle, config, kind: str, stop_after: int | None = None, resume=None):
    """What a user writes: a DataLoader, their loss, AdamW, gradient accumulation, the compression handle."""
    loader = DataLoader(data.train, batch_size=BATCH, sampler=epoch_order(len(data.train), 0, 0).tolist())
    micro = len(loader)
    total = -(-micro // ACCUMULATE)
    compression = compresskit.prepare(model, config, total_steps=total)
    model = compression.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY)
    if resume is not None:                              # the documented resume order
        model.load_state_dict(resume["model"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY)
        optimizer.load_state_dict(resume["optimizer"])
    compression.attach_optimizer(optimizer)
    if resume is not None:
        compression.load_state_dict(resume["compression"])
    loss_fn = _loss(kind)
    model.train()
    for i, (*inputs, label) in enumerate(loader):
        if i < compression.steps * ACCUMULATE:          # batches of the steps done before the checkpoint
            continue
        (loss_fn(model(*inputs), label) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE and i + 1 < micro:
            continue
        compression.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        compression.step()
        if stop_after is not None and compression.steps == stop_after:
            return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "compression": copy.deepcopy(compression.state_dict())}
    return compression.finalize(), compression


@pytest.mark.parametrize("kind", ["fiited", "dasnet"])
def test_hand_written_loop_matches_apply(kind):
    data, model = _bundle_and_model(kind)
    twin = copy.deepcopy(model)
    result = compresskit.apply(model, _recipe(kind, data), data=data)
    config = FiitedConfig(target_memory_ratio=0.3, chunk_size=4, interval=5) if kind == "fiited" \
        else DasnetConfig(sparsity=0.5)
    hand, compression = _hand_loop(twin, data, config, kind)
    assert compression.steps == result.report["training"]["steps"]
    inputs = data.test.tensors[:-1]
    result.model.eval()
    hand.eval()
    with torch.no_grad():
        torch.testing.assert_close(hand(*inputs), result.model(*inputs), rtol=1e-4, atol=1e-5)
    ours = compression.report()["stages"][0]
    theirs = result.report["stages"][0]
    if kind == "fiited":
        assert ours["stored_chunks"] == theirs["stored_chunks"] and ours["pruning_rounds"] == theirs["pruning_rounds"]
        assert ours["memory_ratio"] <= 0.3
        for (_, a), (_, b) in zip(fiited_modules(hand), fiited_modules(result.model)):
            assert torch.equal(a.row_chunk_counts(), b.row_chunk_counts())
    else:
        assert ours["wta_layers"] == theirs["wta_layers"] == 2   # LeNet-5's conv activations (the default)
        assert compression.ctx.sample_input[0].shape == (8, 1, 32, 32)     # captured from the first batch


def test_resume_from_handle_state_is_exact():
    data, model = _bundle_and_model("fiited")
    twin = copy.deepcopy(model)
    config = FiitedConfig(target_memory_ratio=0.3, chunk_size=4, interval=5)
    full, uninterrupted = _hand_loop(model, data, config, "fiited")
    state = _hand_loop(twin, data, config, "fiited", stop_after=12)   # pools already pruned at step 12
    _, fresh = _bundle_and_model("fiited")
    resumed, compression = _hand_loop(fresh, data, config, "fiited", resume=state)
    assert compression.steps == uninterrupted.steps == 15
    assert compression.report() == uninterrupted.report()          # pruning rounds survive the resume too
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_custom_loss_trains_and_prunes_to_target():
    data, model = _bundle_and_model("fiited")
    compression = compresskit.prepare(model, {"plugin": "fiited", "target_memory_ratio": 0.25, "chunk_size": 4,
                                              "start_step": 2, "end_step": 14, "interval": 3})
    optimizer = torch.optim.SGD(compression.model.parameters(), lr=0.1)
    compression.attach_optimizer(optimizer)
    for inputs in DataLoader(data.train, batch_size=128, shuffle=True):
        *x, y = inputs
        logits = compression.model(*x)
        weight = torch.where(y > 0, 3.0, 1.0)           # a user's class-weighted loss
        F.binary_cross_entropy_with_logits(logits, y.float(), weight=weight).backward()
        compression.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        compression.step()
    compression.finalize()
    assert 0.24 <= compression.report()["stages"][0]["memory_ratio"] <= 0.25


def test_config_forms_and_revalidation():
    _, model = _bundle_and_model("fiited")
    for config in (FiitedConfig(chunk_size=4), {"plugin": "fiited", "chunk_size": 4},
                   [{"plugin": "fiited", "chunk_size": 4}], {"stages": [{"plugin": "fiited", "chunk_size": 4}]}):
        compression = compresskit.prepare(copy.deepcopy(model), config, total_steps=10)
        assert compression.plugins[0].config == FiitedConfig(chunk_size=4)
    with pytest.raises(compresskit.ConfigError, match=r"^fiited.target_memory_ratio: got 1.5, expected a value"):
        compresskit.prepare(model, FiitedConfig(target_memory_ratio=1.5))
    with pytest.raises(compresskit.ConfigError, match=r"^config: got int; expected a plugin config"):
        compresskit.prepare(model, 3)


def test_wiring_mistakes_are_clear_errors():
    data, model = _bundle_and_model("fiited")
    user_model = copy.deepcopy(model)
    early = torch.optim.AdamW(user_model.parameters())  # built before prepare swapped the tables
    tables = len(model.embeddings)
    with pytest.raises(compresskit.ConfigError, match=rf"^optimizer: holds {tables} parameter\(s\) the prepared"):
        compresskit.prepare(user_model, FiitedConfig(chunk_size=4), optimizer=early)
    compression = compresskit.prepare(copy.deepcopy(model), FiitedConfig(chunk_size=4))
    with pytest.raises(compresskit.ConfigError, match=r"^fiited.start_fraction: a schedule in fractions of "
                                                      r"training needs its length"):
        compression.step()
    compression = compresskit.prepare(copy.deepcopy(model), FiitedConfig(chunk_size=4), total_steps=10)
    with pytest.raises(compresskit.ConfigError, match=r"^optimizer: embeddings.0's pool is trained by a torch "
                                                      r"optimizer"):
        compression.step()
    compression.finalize()
    with pytest.raises(compresskit.ConfigError, match="finalized"):
        compression.step()
    bad = {"stages": [{"plugin": "fiited", "lazy": False, "method": "mixed_dim", "chunk_size": 4}]}
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\].method: mixed_dim needs training data"):
        compresskit.prepare(copy.deepcopy(model), bad)


def test_lightning_style_example_runs():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "own_training_loop.py")
    spec = importlib.util.spec_from_file_location("own_training_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data, net = _bundle_and_model("fiited")
    module = example.ClickModel(net)
    compression = example.fit(module, DataLoader(data.train, batch_size=128, shuffle=True), steps=8)
    assert compression.steps == 8 and compression.finalized
    assert compression.report()["stages"][0]["memory_ratio"] <= 0.1


def test_gradient_accumulation_never_fuses_the_table_update():
    _, model = _bundle_and_model("fiited")
    recipe = {"train": {"accumulate_grad_batches": 2, "optimizer": {"name": "adagrad", "lr": 0.05}},
              "stages": [{"plugin": "fiited", "chunk_size": 4}]}
    compression = compresskit.prepare(copy.deepcopy(model), recipe)
    assert all(m.optimizer is None and m.store.pool.requires_grad for _, m in fiited_modules(compression.model))
    recipe["train"]["accumulate_grad_batches"] = 1                   # the same recipe fuses Adagrad without it
    compression = compresskit.prepare(copy.deepcopy(model), recipe)
    assert all(m.optimizer == "adagrad" for _, m in fiited_modules(compression.model))
    recipe["train"]["accumulate_grad_batches"] = 4
    recipe["stages"][0]["fused_optimizer"] = "sgd"
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\].fused_optimizer: 'sgd' updates the tables at "
                                                      r"every backward, which gradient accumulation \(4"):
        compresskit.prepare(copy.deepcopy(model), recipe)


def test_recipe_objects_are_revalidated():
    _, model = _bundle_and_model("fiited")
    recipe = compresskit.Recipe(stages=[{"plugin": "fiited", "chunk_size": 4}])   # built in Python, raw stages
    compression = compresskit.prepare(copy.deepcopy(model), recipe, total_steps=5)
    assert compression.plugins[0].config == FiitedConfig(chunk_size=4)
    recipe.stages[0]["chunk_size"] = 0
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\].chunk_size: got 0, expected a value >= 1"):
        compresskit.prepare(copy.deepcopy(model), recipe)


def test_a_validated_recipe_is_validated_once(monkeypatch):
    """A Recipe from validate_recipe runs without a second validation; editing it afterwards brings one back."""
    import compresskit.recipe as recipe_module

    data, model = _bundle_and_model("fiited")
    recipe = compresskit.validate_recipe({"train": {"epochs": 1, "batch_size": 500},
                                          "stages": [{"plugin": "fiited", "chunk_size": 4}]})
    calls = []
    real = recipe_module.build
    monkeypatch.setattr(recipe_module, "build", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    result = compresskit.apply(copy.deepcopy(model), recipe, data=data)
    assert calls == [] and result.report["training"]["steps"] == -(-len(data.train) // 500)   # planned once
    recipe.stages[0].config.chunk_size = 0
    with pytest.raises(compresskit.ConfigError, match=r"^stages\[0\].chunk_size: got 0, expected a value >= 1"):
        compresskit.prepare(copy.deepcopy(model), recipe)
    assert calls
    from compresskit.recipe import is_validated
    from compresskit.schema import to_dict

    fresh = compresskit.validate_recipe({"train": {"batch_size": 256}, "stages": [{"plugin": "fiited"}]})
    assert is_validated(fresh) and is_validated(copy.deepcopy(fresh))
    fresh.train.batch_size = 256.0                                   # equal as a number, not the validated type
    assert not is_validated(fresh)
    fresh = compresskit.validate_recipe({"train": {"batch_size": 256}, "stages": [{"plugin": "fiited"}]})
    fresh.train.optimizer = to_dict(fresh.train.optimizer)            # the same values as a raw dict
    assert not is_validated(fresh)


def test_one_registry_type_with_one_error():
    registry = compresskit.Registry("widget", "widget.name", populate=lambda: registry.add("gear", 1))
    with pytest.raises(ValueError, match="widget name 'gear' is taken"):
        registry.add("gear", 2)                       # the populated entries are there before a user's
    assert registry.get("gear") == 1 and list(registry) == ["gear"]
    with pytest.raises(compresskit.ConfigError, match=r"^widget.name: unknown widget 'geer' \(did you mean "
                                                      r"'gear'\?\); available: gear$"):
        registry.get("geer")
    with pytest.raises(compresskit.ConfigError, match=r"^model.name: unknown model 'lenet' \(did you mean "
                                                      r"'lenet5'\?\).*'pkg.module:factory'"):
        compresskit.models.MODELS.get("lenet")
