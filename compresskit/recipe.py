"""Recipes: YAML (``yaml.safe_load``) -> typed :class:`Recipe`, through the one validator in :mod:`schema`."""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import yaml

from .errors import ConfigError, first_line, key_text, shorten
from .schema import build, option, to_dict

if TYPE_CHECKING:   # recipe files are read and checked before torch is imported
    from .plugin import Plugin


@dataclass
class ModelConfig:
    """Which model to build: a built-in name, 'pkg.module:factory' or 'torchvision:<name>'."""

    name: str = option(help="built-in model name, 'pkg.module:factory' or 'torchvision:<name>'")
    args: dict[str, Any] = option({}, help="keyword arguments for the model factory")
    checkpoint: Optional[str] = option(None, help="state dict to load (torch.load weights_only; checked against its "
                                                  ".sha256 when there is one): before the stages when its keys fit "
                                                  "the built model, after them otherwise (a compressed model.pt)")


@dataclass
class DataConfig:
    """Which dataset to load and from where."""

    name: str = option(help="built-in dataset name (see docs/recipes.md)")
    path: Optional[str] = option(None, help="file or folder of the dataset in its upstream format")
    args: dict[str, Any] = option({}, help="keyword arguments for the dataset loader")
    collate: Optional[str] = option(None, help="maps each batch to the model's inputs: 'torchrec' (dense + a "
                                               "KeyedJaggedTensor) or 'pkg.module:function' (docs/recipes.md)")


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
    shuffle: bool = option(True, help="shuffle the training split every epoch (false: its stored order, e.g. a "
                                      "time-ordered stream)")
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
        "table_wise", help="embedding tables of EmbeddingTables collections (DLRM's) and TorchRec "
                           "EmbeddingBagCollections: one owner rank each, bytes and lookups balanced (table_wise), or "
                           "replicated and synchronised by DDP (none)")
    timeout_s: float = option(300.0, help="seconds a collective waits for the other ranks before the run fails",
                              min=1)
    prefetch_ids: bool = option(True, help="send the next batch's ids to their tables' owners while this batch "
                                           "trains (TorchRec's pipelined input distribution; the same results)")
    replace_tables: bool = option(True, help="once pruning has settled, at a checkpoint where the ranks' table "
                                             "bytes are more than 10% uneven, place the tables again by their bytes "
                                             "then (a checkpoint, then a resume with the new placement; a "
                                             "recipe-built model with an output dir)")


@dataclass
class LoggingConfig:
    """What a training run logs (docs/recipes.md#logging): a CSV and TensorBoard events of per-step metrics, Python
    logging, and the report's plots."""

    csv: bool = option(True, help="write output.dir/train_log.csv: step, loss, learning rate, steps/s and each "
                                  "stage's metrics (FIITED: kept ratio, payload/index bytes)")
    every: int = option(10, help="log a row every N optimizer steps (and at the last step)", min=1)
    tensorboard: Literal["auto", "always", "never"] = option(
        "auto", help="TensorBoard events in output.dir/tensorboard: auto (when the tensorboard package is installed), "
                     "always (an error when it is not), never")
    level: Literal["debug", "info", "warning", "error"] = option(
        "info", help="level of the records compresskit's Python loggers write to output.dir/run.log")
    console: Literal["debug", "info", "warning", "error"] = option(
        "warning", help="level of the records compresskit apply prints to the console (stderr; the progress bar "
                        "shows progress)")
    plots: bool = option(True, help="PNG plots in output.dir/plots, inlined in report.html")

    def validate(self, path: str) -> None:
        if self.tensorboard == "always":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(f"{path}.tensorboard" if path else "tensorboard",
                                  "got 'always', but the tensorboard package is not installed (pip install "
                                  "tensorboard); use auto to log without it")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = option("runs/compresskit", help="output folder for model.pt, report.json, report.md")

    def validate(self, path: str) -> None:
        if not self.dir.strip():
            raise ConfigError(f"{path}.dir" if path else "dir", "got '', expected a folder name")


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
            raise ConfigError(path, f"got {shorten(item)}, expected a mapping with a 'plugin' key")
        if "plugin" not in item:
            raise ConfigError(f"{path}.plugin", "required field is missing (name of the plugin to apply)")
        if not isinstance(item["plugin"], str):
            raise ConfigError(f"{path}.plugin", f"got {shorten(item['plugin'])}, expected a plugin name")
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
    # stages last: validating them loads the plugins (and torch), so errors in the sections above come faster
    output: OutputConfig = option({}, help="output settings")
    distributed: DistributedConfig = option({}, help="multi-process settings (used under torchrun / --nproc)")
    logging: LoggingConfig = option({}, help="training logs (CSV, TensorBoard), Python logging and plots")
    stages: list[Stage] = option([], help="plugin stages, applied in order")


def validate_recipe(data: Any, *, require_model: bool = False) -> Recipe:
    """Validate a recipe dict into a typed :class:`Recipe` (stages included). Raises ConfigError."""
    if data is None:
        raise ConfigError("", "the recipe is empty")
    recipe = build(Recipe, data)
    stages = recipe.stages
    analysis_only = bool(stages) and all(s.plugin.kind == "analysis" for s in stages)
    if analysis_only and recipe.train is not None and recipe.model is None:
        names = ", ".join(s.plugin.name for s in stages)
        raise ConfigError("train", f"this recipe's stages ({names}) analyse without training and it names no "
                                   f"model, so there is nothing to train; drop train (and --set train.*)")
    needs_model = recipe.train is not None or any(s.plugin.kind == "transform" for s in stages) or not stages
    if require_model and needs_model and recipe.model is None:
        raise ConfigError("model", "required field is missing (a model is needed to run a recipe from a file)")
    if recipe.data is not None:
        from .data import check_data_config
        from .resolve import collate_function

        check_data_config(recipe.data)
        if recipe.data.collate is not None:
            collate_function(recipe.data.collate)
    if recipe.model is not None:
        from .resolve import check_model_config

        check_model_config(recipe.model, data_known=recipe.data is not None)
        if recipe.model.checkpoint and not os.path.isfile(recipe.model.checkpoint):
            raise ConfigError("model.checkpoint", f"file not found: {shorten(recipe.model.checkpoint)}")
    needs_training = any(s.plugin.kind == "transform" for s in stages)
    if recipe.train is not None and recipe.data is None and needs_training and require_model:
        raise ConfigError("data", "required field is missing (training needs a dataset)")
    recipe._validated_as = repr(recipe)   # what was checked, types included, so that is_validated sees later edits
    return recipe


def is_validated(recipe: Recipe) -> bool:
    """True for a Recipe :func:`validate_recipe` returned and nobody changed since (a Recipe built in Python, or
    one edited after validation, is validated again before it runs). The comparison is of the dataclasses' reprs,
    which name every class and type: a raw dict put where a typed section was, or 256.0 where 256 was, counts as
    an edit."""
    return getattr(recipe, "_validated_as", None) == repr(recipe)


MAX_RECIPE_BYTES = 1 << 20   # a recipe is settings, not data: data goes in data.path
MAX_DEPTH = 32               # deeper than any recipe needs; deeper input is a mistake or an attack
MAX_VALUES = 100_000


def read_yaml(path: str) -> Any:
    """``yaml.safe_load`` a UTF-8 recipe file; size, encoding, syntax and nesting problems become one-line
    ConfigErrors (with line numbers where YAML gives them)."""
    if not os.path.isfile(path):
        raise ConfigError("recipe", f"file not found: '{path}'")
    size = os.path.getsize(path)
    if size > MAX_RECIPE_BYTES:
        raise ConfigError("recipe", f"'{path}' is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes "
                                    f"(point data.path at data files instead of inlining them)")
    with open(path, "rb") as f:
        data = f.read()
    text = decode_text(data, path)
    try:
        value = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError("recipe", f"YAML syntax error in '{path}' at {where}: {shorten(e.problem, 200)}") from None
    except yaml.YAMLError as e:
        raise ConfigError("recipe", f"YAML error in '{path}': {shorten(str(e), 200)}") from None
    except RecursionError:
        raise ConfigError("recipe", f"'{path}' nests deeper than Python can read; a recipe nests at most "
                                    f"{MAX_DEPTH} levels") from None
    except Exception as e:   # a value PyYAML parses but cannot build: 2001-02-30, !!int abc, a 5,000-digit integer
        raise ConfigError("recipe", f"cannot read a value in '{path}' ({type(e).__name__}: {first_line(e, 120)}); "
                                    f"quote it to make it a string") from None
    check_depth(value, "recipe")
    return value


def decode_text(data: bytes, path: str) -> str:
    """The UTF-8 text of a recipe; gzip, UTF-16/32 and other encodings are refused with where the bad byte is."""
    if data[:2] == b"\x1f\x8b":
        raise ConfigError("recipe", f"'{path}' is gzip-compressed; decompress it (recipes are UTF-8 YAML text)")
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            raise ConfigError("recipe", f"'{path}' is {name} text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError("recipe", f"'{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                                    f"save it as UTF-8") from None


def check_depth(value: Any, path: str) -> None:
    """Refuse values nested deeper than :data:`MAX_DEPTH` or expanding to more than :data:`MAX_VALUES` items (YAML
    aliases can make a small file expand exponentially), before anything recurses through them."""
    stack, seen = [(value, path, 0)], 0
    while stack:
        node, where, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError("recipe", f"expands to more than {MAX_VALUES:,} values (repeated YAML aliases?); "
                                        f"a recipe is a few hundred settings")
        if depth > MAX_DEPTH:
            raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels; a recipe nests at most {MAX_DEPTH}")
        if isinstance(node, dict):
            stack += [(item, key_text(key) if where == "recipe" else f"{where}.{key_text(key)}", depth + 1)
                      for key, item in node.items()]
        elif isinstance(node, list):
            stack += [(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(node)]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML; list items by index: ``stages.0.x=1``)."""
    data = copy.deepcopy(data) if data is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"got {shorten(item)}, expected KEY.PATH=VALUE")
        key, _, raw = item.partition("=")
        key = key[:80]
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


ENV_REFERENCE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def expand_environment(data: Any, where: str = "") -> Any:
    """``data`` with every ``${NAME}`` / ``${NAME:-default}`` in its strings replaced by the environment variable,
    as a shell does: ``${NAME:-default}`` takes the default when ``NAME`` is unset or empty, ``${NAME}`` takes the
    value even when empty, and an unset ``${NAME}`` is a ConfigError naming the field and the variable. ``$${``
    writes a literal ``${``. A string that is one reference and nothing else is read as YAML once expanded
    (``epochs: ${EPOCHS:-3}`` gives the number 3), as ``--set`` values are."""
    if isinstance(data, dict):
        return {k: expand_environment(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_environment(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(match: re.Match) -> str:
        escaped, name, default = match.group(1), match.group(2), match.group(3)
        if escaped:
            return match.group(0)[1:]
        found = os.environ.get(name)
        if default is not None:
            return found if found else default[2:]
        if found is not None:
            return found
        raise ConfigError(where, f"environment variable {name} is not set (the value is {shorten(data)}); set it, "
                                 f"write ${{{name}:-default}}, or give the value with --set {where}=...")

    expanded = ENV_REFERENCE.sub(value, data)
    whole = ENV_REFERENCE.fullmatch(data)
    if whole and not whole.group(1):
        try:
            return yaml.safe_load(expanded) if expanded.strip() else expanded
        except yaml.YAMLError:
            return expanded
    return expanded


def load_recipe(path: str, overrides: list[str] | None = None, *, require_model: bool = True
                ) -> tuple[Recipe, dict[str, Any]]:
    """Read, ``--set``-override, expand ``${ENV}`` references (:func:`expand_environment`) and validate a recipe
    file. Returns (recipe, raw dict after overrides and expansion)."""
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError("recipe", f"'{path}' is empty")
    if not isinstance(raw, dict):
        raise ConfigError("recipe", f"'{path}' must hold a mapping at top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    check_depth(raw, "recipe")
    raw = expand_environment(raw)
    return validate_recipe(raw, require_model=require_model), raw
