"""Recipes: YAML (``yaml.safe_load``) -> typed :class:`Recipe`, through the one validator in :mod:`schema`."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .plugin import Plugin
from .schema import build, option, to_dict


@dataclass
class ModelConfig:
    """Which model to build: a built-in name, 'pkg.module:factory' or 'torchvision:<name>'."""

    name: str = option(help="built-in model name, 'pkg.module:factory' or 'torchvision:<name>'")
    args: dict[str, Any] = option({}, help="keyword arguments for the model factory")
    checkpoint: Optional[str] = option(None, help="state dict to load after building (torch.load weights_only)")


@dataclass
class DataConfig:
    """Which dataset to load and from where."""

    name: str = option(help="built-in dataset name (see docs/recipes.md)")
    path: Optional[str] = option(None, help="file or folder of the dataset in its upstream format")
    args: dict[str, Any] = option({}, help="keyword arguments for the dataset loader")


@dataclass
class OptimizerConfig:
    """The optimizer for training."""

    name: Literal["sgd", "adam", "adamw", "adagrad"] = option("adagrad", help="optimizer")
    lr: float = option(0.05, help="learning rate", min=0, min_exclusive=True)
    weight_decay: float = option(0.0, help="L2 weight decay", min=0)
    momentum: float = option(0.0, help="momentum (sgd only)", min=0, max=1, max_exclusive=True)


@dataclass
class TrainConfig:
    """Training settings shared by every plugin."""

    epochs: int = option(1, help="passes over the training split", min=0)
    batch_size: int = option(256, help="training batch size (one micro-batch when accumulating)", min=1)
    accumulate_grad_batches: int = option(1, help="micro-batches whose gradients are summed per optimizer step "
                                                  "(each loss divided by this)", min=1)
    eval_batch_size: int = option(4096, help="evaluation batch size", min=1)
    optimizer: OptimizerConfig = option({}, help="optimizer settings")
    seed: int = option(0, help="seed for initialisation and shuffling", min=0)
    max_steps: Optional[int] = option(None, help="stop after this many optimizer steps", min=1)
    checkpoint_every: int = option(200, help="write a resumable checkpoint every N steps", min=1)
    threads: Optional[int] = option(None, help="torch CPU threads (default: torch's choice)", min=1)
    progress: bool = option(True, help="show a tqdm progress bar")


@dataclass
class DistributedConfig:
    """How a run launched on several processes (torchrun, ``--nproc``) spreads over them (docs/distributed.md)."""

    backend: Literal["auto", "gloo", "nccl"] = option("auto", help="process-group backend (auto: nccl with CUDA, "
                                                                   "gloo on CPU)")
    sharding: Literal["table_wise", "none"] = option(
        "table_wise", help="embedding tables of EmbeddingTables collections (DLRM's): one owner rank each, balanced "
                           "by bytes (table_wise), or replicated and synchronised by DDP (none)")
    timeout_s: float = option(300.0, help="seconds a collective waits for the other ranks before the run fails",
                              min=1)


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = option("runs/compresskit", help="output folder for model.pt, report.json, report.md")


class Stage:
    """One validated stage: the plugin class, its typed config and where it sits in the recipe (``stages[0]``)."""

    type_name = "mapping with a 'plugin' key and that plugin's fields"

    def __init__(self, plugin: type[Plugin], config: Any, path: str | None = None) -> None:
        self.plugin, self.config = plugin, config
        self.path = path or plugin.name

    @classmethod
    def from_config(cls, item: Any, path: str) -> "Stage":
        """Validate ``{'plugin': name, **fields}`` against the named plugin's Config."""
        from .registry import get_plugin

        if not isinstance(item, dict):
            raise ConfigError(path, f"got {item!r}, expected a mapping with a 'plugin' key")
        if "plugin" not in item:
            raise ConfigError(f"{path}.plugin", "required field is missing (name of the plugin to apply)")
        if not isinstance(item["plugin"], str):
            raise ConfigError(f"{path}.plugin", f"got {item['plugin']!r}, expected a plugin name")
        plugin = get_plugin(item["plugin"], f"{path}.plugin")
        return cls(plugin, build(plugin.Config, {k: v for k, v in item.items() if k != "plugin"}, path), path)

    def instantiate(self) -> Plugin:
        """A fresh plugin instance for this stage, knowing its recipe path for errors."""
        plugin = self.plugin(self.config)
        plugin.path = self.path
        return plugin

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin.name, **to_dict(self.config)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and (self.plugin, self.config, self.path) == \
            (other.plugin, other.config, other.path)

    def __repr__(self) -> str:
        return f"Stage({self.plugin.name}, {self.config!r}, path={self.path!r})"


@dataclass
class Recipe:
    """A validated recipe: model, data, training and the ordered list of typed plugin stages."""

    model: Optional[ModelConfig] = option(None, help="model to build (optional with the Python API)")
    data: Optional[DataConfig] = option(None, help="dataset (optional for analysis-only recipes)")
    train: Optional[TrainConfig] = option(None, help="training settings (omit to skip training)")
    stages: list[Stage] = option([], help="plugin stages, applied in order")
    output: OutputConfig = option({}, help="output settings")
    distributed: DistributedConfig = option({}, help="multi-process settings (used under torchrun / --nproc)")


def validate_recipe(data: Any, *, require_model: bool = False) -> Recipe:
    """Validate a recipe dict into a typed :class:`Recipe` (stages included). Raises ConfigError."""
    if data is None:
        raise ConfigError("", "the recipe is empty")
    recipe = build(Recipe, data)
    stages = recipe.stages
    needs_model = recipe.train is not None or any(s.plugin.kind == "transform" for s in stages) or not stages
    if require_model and needs_model and recipe.model is None:
        raise ConfigError("model", "required field is missing (a model is needed to run a recipe from a file)")
    if recipe.data is not None:
        from .data import check_data_config

        check_data_config(recipe.data)
    if recipe.model is not None and recipe.model.checkpoint and not os.path.exists(recipe.model.checkpoint):
        raise ConfigError("model.checkpoint", f"file not found: '{recipe.model.checkpoint}'")
    needs_training = any(s.plugin.kind == "transform" for s in stages)
    if recipe.train is not None and recipe.data is None and needs_training and require_model:
        raise ConfigError("data", "required field is missing (training needs a dataset)")
    return recipe


def read_yaml(path: str) -> Any:
    """``yaml.safe_load`` a file, turning I/O and syntax errors into one-line ConfigErrors with line numbers."""
    if not os.path.isfile(path):
        raise ConfigError("recipe", f"file not found: '{path}'")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError("recipe", f"YAML syntax error in '{path}' at {where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError("recipe", f"YAML error in '{path}': {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML; list items by index: ``stages.0.x=1``)."""
    data = copy.deepcopy(data) if data is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"got '{item}', expected KEY.PATH=VALUE")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            nxt = parts[j + 1]
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}", f"'{part}' is not an index of a list of {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = [] if nxt.isdigit() else {}
                node = node[part]
            else:
                raise ConfigError(f"--set {key}", f"'{'.'.join(parts[:j])}' is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}", f"'{last}' is not an index of a list of {len(node)}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {key}", "parent is not a mapping")
    return data


def load_recipe(path: str, overrides: list[str] | None = None, *, require_model: bool = True
                ) -> tuple[Recipe, dict[str, Any]]:
    """Read, ``--set``-override and validate a recipe file. Returns (recipe, raw dict after overrides)."""
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError("recipe", f"'{path}' is empty")
    if not isinstance(raw, dict):
        raise ConfigError("recipe", f"'{path}' must hold a mapping at top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, require_model=require_model), raw
