"""Export a compressed model for serving (``compresskit export RUN_DIR --format ...``; docs/export.md).

Three formats:

* ``state-dict``: every compressed table becomes the standard module it replaced (:func:`to_state_dict`: FIITED
  tables with their pruned dims as zeros, the baselines' dense equivalents), so the state dict loads with
  ``strict=True`` into the original architecture and computes the same outputs.
* ``packed``: FIITED tables become inference-only packed tables (:func:`pack`): only the stored chunks and the
  1.125-byte-a-row index. Saved as a state dict plus a JSON spec of the packed modules; :func:`load_packed` puts them
  into the original architecture.
* ``torch.export``: the packed model through ``torch.export.export`` (:func:`export_program`), saved as ``.pt2``.

The core knows no table types: a compressed module that can be served as a standard one has a ``to_dense()``
method, one with a compact inference form a ``to_packed()`` method (whose result has ``record_args()`` and
``table_bytes()``, ``compresskit.table_types``); :func:`convert_modules` swaps them. :func:`load_run` rebuilds a run's compressed model from
its output folder.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import integrity
from .atomic import prepare_output_dir, write_json
from .compression import prepare
from .data import DataBundle
from .data.batches import sample_inputs
from .errors import CheckpointError, CompressKitError, ConfigError, first_line, shorten
from .layout import LAYOUT_FILE, Layout, apply_layout, read_layout, recordable_class
from .recipe import ModelConfig, Recipe, validate_recipe
from .table_types import dense_bytes
from .resolve import load_weights, read_state_dict, resolve_data, resolve_model

FORMATS = ("state-dict", "packed", "torch.export")
DEFAULT_NAMES = {"state-dict": "model_dense.pt", "packed": "model_packed.pt", "torch.export": "model.pt2"}
SPEC_FORMAT = "compresskit-packed"
SPEC_VERSION = 4          # 2: packed tables carry their storage (fp32 / int8 / int4) and FP32 hot-row cache;
READABLE_VERSIONS = (1, 2, 3, 4)  # 3: the index in blocks of 64 rows (single tables of 1 and 2 are converted on
#                                   load); 4: the cache holds stored chunks only (flat, with starts; 3's full rows are
#                                   converted on load) and cached rows keep no codes; row-wise scales


# --------------------------------------------------------------------------------------------------- conversion
def convert_modules(model: nn.Module, method: str, keep: tuple[nn.Module, ...] = ()) -> list[str]:
    """Replace (in place) every submodule of ``model`` that has a callable ``method`` (``to_dense``,
    ``to_packed``) by what that method returns, except the modules in ``keep``; a replaced (or kept) module's
    children are not visited, and a module shared by several parents is converted once. Returns the names
    replaced, in module order. A method that returns None leaves its module (and what is inside it) as it is."""
    if callable(getattr(model, method, None)):
        raise ConfigError("model", f"{type(model).__name__} is itself a table: call its {method}() directly; "
                                   f"export converts the tables inside a model")
    done: dict[int, nn.Module] = {}
    names: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            if any(child is k for k in keep):
                continue
            convert = getattr(child, method, None)
            if callable(convert):
                if id(child) not in done:
                    done[id(child)] = convert()
                if done[id(child)] is not None:
                    setattr(parent, name, done[id(child)])
                    names.append(prefix + name)
            else:
                visit(child, f"{prefix}{name}.")

    visit(model, "")
    return names


def densify(model: nn.Module) -> nn.Module:
    """Swap (in place) every compressed table of ``model`` for the standard module it replaced (``to_dense()``);
    returns ``model``."""
    convert_modules(model, "to_dense")
    return model


def dequantize_weights(model: nn.Module) -> list[str]:
    """Replace (in place) every quantized tensor-subclass parameter of ``model`` (torchao's int8 weights of
    DASNet's ``quantize: int8``) by the float tensor it stands for, so that the state dict loads into the original
    architecture with ``weights_only=True``. Returns the parameter names replaced."""
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if type(param) not in (torch.Tensor, nn.Parameter) and callable(getattr(param, "dequantize", None)):
                setattr(module, name, nn.Parameter(param.dequantize().detach(), requires_grad=False))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def to_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with every compressed table as the standard module it replaced and quantized
    weights as floats: it loads with ``strict=True`` into the original architecture. Converts ``model`` in place
    (:func:`densify`, :func:`dequantize_weights`)."""
    densify(model)
    dequantize_weights(model)
    return model.state_dict()


def pack(model: nn.Module, dequantize: bool = True) -> dict[str, Any]:
    """Swap (in place) every table that has an inference-only form for it (``to_packed()``: FIITED tables), a table
    collection whose packed tables can share one module for that module (``to_batched()``: one op call serves
    them all), and
    every other compressed module for its standard one (``to_dense()``), quantized weights dequantized unless
    ``dequantize`` is False (``torch.export`` keeps them). Returns the spec: the packed modules with their class
    and constructor arguments (what :func:`load_packed` needs) and the bytes of every table."""
    packed = convert_modules(model, "to_packed")
    batched = convert_modules(model, "to_batched")   # a collection whose packed tables one op call serves
    packed = [n for n in packed if not any(n.startswith(f"{b}.") for b in batched)] + batched
    convert_modules(model, "to_dense", keep=tuple(model.get_submodule(name) for name in packed))
    if dequantize:
        dequantize_weights(model)
    modules = {}
    for name in packed:
        module = model.get_submodule(name)
        cls = type(module)
        modules[name] = {"class": f"{cls.__module__}:{cls.__qualname__}", "args": module.record_args()}
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "modules": modules, **table_bytes(model, packed)}


def table_bytes(model: nn.Module, packed: list[str]) -> dict[str, Any]:
    """Bytes of every embedding table of a packed model: ``values`` (FP32 values, or INT8 / INT4 codes and their
    scales), ``cache`` (the FP32 hot rows) and ``index`` of the packed ones (names in ``packed``; the bytes of the
    tensors the packed file holds), the weight of plain ``nn.Embedding`` / ``nn.EmbeddingBag`` ones, each against its
    dense FP32 bytes; ``tables`` (one row each) and ``bytes`` (totals and ``ratio`` = total / dense)."""
    rows = []
    names = set(packed)
    for name, module in model.named_modules():
        if name in names:   # a FIITED packed table (collection), or a baseline in its own natural form
            held = module.table_bytes()
            values, cache, index = held.payload - held.cache, held.cache, held.index
            dense = dense_bytes(module)
            storage = getattr(module, "storage", "fp32")
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            values = dense = module.weight.numel() * module.weight.element_size()
            cache = index = 0
            storage = str(module.weight.dtype).removeprefix("torch.")
        else:
            continue
        rows.append({"module": name, "packed": name in names, "storage": storage, "values_bytes": values,
                     "cache_bytes": cache, "index_bytes": index, "total_bytes": values + cache + index,
                     "dense_bytes": dense})
    total = {key: sum(r[f"{key}_bytes"] for r in rows) for key in ("values", "cache", "index", "total", "dense")}
    total["ratio"] = total["total"] / total["dense"] if total["dense"] else None
    return {"tables": rows, "bytes": total}


# --------------------------------------------------------------------------------------------------- packed files
def spec_path(path: str | os.PathLike) -> Path:
    """The JSON spec written next to packed weights: ``model_packed.pt`` -> ``model_packed.json``."""
    path = Path(path)
    spec = path.with_suffix(".json")
    if spec == path:
        raise ConfigError("--out", f"{shorten(str(path))}: the packed weights need a name not ending in .json "
                                   f"(their spec is written next to them as <name>.json)")
    return spec


def save_packed(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """:func:`pack` ``model`` and write its state dict to ``path`` (with a SHA-256 sidecar) and the spec to
    :func:`spec_path` (each atomically). Returns the spec."""
    spec_path(path)   # a bad name fails before the model is converted
    spec = pack(model)
    write_packed(model, spec, path)
    return spec


def write_packed(model: nn.Module, spec: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a packed model's state dict to ``path`` (with its SHA-256 sidecar) and ``spec`` (naming the weights
    file) to :func:`spec_path`, each atomically."""
    integrity.save(path, model.state_dict())
    spec["weights"] = Path(path).name
    write_json(spec_path(path), spec)


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The packed spec in ``path`` (JSON), or a one-line CheckpointError."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(str(path), "file not found (compresskit export --format packed writes this spec "
                                         "next to the packed weights)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(str(path), f"not a readable JSON spec ({first_line(e, 120)})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT or not isinstance(spec.get("modules"), dict):
        raise CheckpointError(str(path), f"is not a packed spec (expected a JSON object with format "
                                         f"'{SPEC_FORMAT}' and 'modules')")
    if spec.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(str(path), f"packed format version {shorten(spec.get('version'))}; this compresskit "
                                         f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: export the run "
                                         f"again with this compresskit, or load it with the one that wrote it")
    batched = [name for name, entry in spec["modules"].items()
               if isinstance(entry, dict) and str(entry.get("class")).endswith("PackedTables")]
    if batched and spec["version"] < 3:
        raise CheckpointError(str(path), f"packed format version {spec['version']} serves '{batched[0]}' through the "
                                         f"older 8-row index, which batched tables cannot convert: export the run "
                                         f"again with this compresskit")
    return spec


def swap_in_packed(model: nn.Module, spec: dict[str, Any], where: str) -> None:
    """Replace (in place) the modules of ``model`` that ``spec`` names by empty packed modules of the spec's
    shapes; one-line CheckpointError (naming ``where``) when a module is missing or its size differs."""
    for name, entry in spec["modules"].items():
        entry = entry if isinstance(entry, dict) else {}
        cls = recordable_class(str(entry.get("class")), where)
        args = dict(entry.get("args") or {})
        if "dtype" in args:
            dtype = getattr(torch, str(args["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(where, f"module '{name}': unknown dtype {shorten(args['dtype'])}")
            args["dtype"] = dtype
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(where, f"module '{name}' is not in the {type(model).__name__} given: load into the "
                                         f"model the run's recipe builds (before any stage)") from None
        if hasattr(old, "num_embeddings") and hasattr(old, "embedding_dim"):
            model_shape = (old.num_embeddings, old.embedding_dim)
            file_shape = (args.get("num_embeddings"), args.get("embedding_dim"))
            if model_shape != file_shape:
                raise CheckpointError(where, f"table '{name}' is {model_shape[0]} x {model_shape[1]} in the model "
                                             f"but {shorten(file_shape[0])} x {shorten(file_shape[1])} in the file: "
                                             f"load into the model the run's recipe builds")
        try:
            new = cls.from_record(model, name, args)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(where, f"module '{name}': {first_line(e, 120)}") from None
        model.set_submodule(name, new)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line CheckpointError naming what does not fit."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # shapes: torch's first line is only "Error(s) in loading state_dict for X:"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(path, f"does not fit the model: {(lines[1:] or lines or ['?'])[0][:200]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(path, f"does not fit the model: missing {_few(result.missing_keys)}; unexpected "
                                    f"{_few(result.unexpected_keys)}")


def _few(names: list[str]) -> str:
    names = sorted(names)
    return (", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")) if names else "none"


def load_packed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load packed weights (``compresskit export --format packed``) into ``model``, a freshly built model of the
    original architecture: the modules the spec (``<path stem>.json``) names are swapped for packed tables, then
    the state dict (checked against its ``.sha256`` sidecar) is loaded strictly. Returns ``model`` (on the CPU)."""
    spec_file = spec_path(path)
    swap_in_packed(model, read_spec(spec_file), str(spec_file))
    _load_strict(model, read_state_dict(str(path)), str(path))
    return model


# --------------------------------------------------------------------------------------------------- torch.export
def export_program(model: nn.Module, sample_inputs: tuple, dynamic_batch: bool = True
                   ) -> torch.export.ExportedProgram:
    """:func:`pack` ``model`` (in place), put it in eval mode and ``torch.export.export`` it on ``sample_inputs``
    (a tuple of positional model inputs). With ``dynamic_batch`` the first dimension of every tensor input is
    marked ``Dim.AUTO``: dynamic where the model allows, else specialised to the sample's size (see
    :func:`batch_is_dynamic`). A model torch.export cannot trace is a one-line ConfigError with the first line of
    torch's reason (the log messages and graphs torch prints during the trace are dropped then; call
    ``torch.export.export`` yourself to see them)."""
    pack(model, dequantize=False)
    model.eval()
    # copies: a view would bring its whole storage (e.g. the test split) into the saved program's sample inputs
    args = tuple(a.clone() if torch.is_tensor(a) else a for a in sample_inputs)
    shapes = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(a) and a.dim() else None for a in args) \
        if dynamic_batch else None
    # a failed trace logs and prints its partial graphs: the one-line error below says why instead
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            program = torch.export.export(model, args, dynamic_shapes=shapes)
    except Exception as e:   # torch.export raises many types (UserError, guard and tracing errors, ...)
        raise ConfigError("torch.export", f"cannot export {type(model).__name__}: {first_line(e, 240)}") from None
    finally:
        torch_log.setLevel(level)
    sys.stderr.write(printed.getvalue())   # a successful trace keeps what it printed
    return program


def batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    """Whether the first tensor input of ``program`` takes any batch size (its first dimension is symbolic)."""
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            value = node.meta.get("val")
            if torch.is_tensor(value) and value.dim():
                return isinstance(value.shape[0], torch.SymInt)
    return False


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """``torch.export.save`` ``program`` to ``path`` atomically, with a SHA-256 sidecar (``<path>.sha256``) as
    ``model.pt`` has."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:   # a file object: torch warns about a file name not ending in .pt2
            torch.export.save(program, f)

    integrity.publish(path, write)
    return Path(path)


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` a program :func:`save_program` wrote, after checking its sidecar. The custom ops of
    installed compresskit plugins (the packed tables' ``compresskit::packed_bag``) are registered first; a program that
    calls an op nobody registered, or a file that is not a program, is a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(str(path), "file not found")
    integrity.verify(path, required=True)
    from .registry import available_plugins

    available_plugins()    # imports the plugins, which register their ops (FIITED: compresskit::packed_bag)
    export_log = logging.getLogger("torch.export")   # torch.export.load logs why it failed, and raises a generic
    said = io.StringIO()                              # error: keep what it logs for the one line below
    handler = logging.StreamHandler(said)
    handlers = export_log.handlers
    export_log.handlers = [handler]
    try:
        return torch.export.load(str(path))
    except Exception as e:   # torch raises many types for unknown ops and damaged archives
        log = said.getvalue() + str(e)
        op = re.search(r"resolve torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)", log)
        if op:
            namespace = op.group(1)
            hint = ("import compresskit.plugins.fiited first (or a compresskit that defines it)"
                    if namespace == "compresskit" else f"import the package that defines the '{namespace}' ops first")
            raise CheckpointError(str(path), f"the program calls {namespace}::{op.group(2)}, which no imported "
                                             f"package has registered: {hint}") from None
        node = re.search(r"Failed deserializing node .*?target='torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)", log)
        if node:   # the op exists but takes other arguments: written by another version of its package
            raise CheckpointError(str(path), f"the program calls {node.group(1)}::{node.group(2)} with arguments the "
                                             f"installed version of that op does not take: export it again with the "
                                             f"installed {node.group(1)}, or load it with the version that wrote "
                                             f"it") from None
        raise CheckpointError(str(path), f"not a loadable torch.export program ({first_line(e, 160)})") from None
    finally:
        export_log.handlers = handlers


# --------------------------------------------------------------------------------------------------- runs
def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, Recipe, DataBundle | None]:
    """Rebuild the compressed model of a ``compresskit apply`` output folder and load its ``model.pt`` (verified
    against its sidecar). The model comes from the run's layout record (``layout.json``, :mod:`compresskit.layout`):
    the recipe's model factory with the arguments the run used, every module the stages put in swapped in as
    recorded; no data is read and no stage runs. Runs written before layout records rebuild the older way: data
    and model resolved from the recipe in ``report.json`` and its stages prepared (no training), which cannot
    rebuild a model whose stages change it in ``finalize`` (DASNet). Returns (model in eval mode, recipe, data:
    resolved for the sample batch when the recipe names data and it is found, else None)."""
    run_dir = str(run_dir)
    if not os.path.isdir(run_dir):
        raise ConfigError("RUN_DIR", f"{shorten(run_dir)} is not a folder: give the output folder of a "
                                     f"compresskit apply run (it holds model.pt and report.json)")
    raw = _saved_recipe(os.path.join(run_dir, "report.json"))
    weights = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(weights):
        raise CheckpointError(weights, "file not found: the run wrote no model")
    integrity.verify(weights, required=True)     # before anything slow
    recipe = validate_recipe(raw, require_model=True)
    layout_file = os.path.join(run_dir, LAYOUT_FILE)
    if os.path.isfile(layout_file):
        layout = read_layout(layout_file)
        model = apply_layout(_layout_model(layout), layout.modules, layout_file)
        load_weights(model, read_state_dict(weights), weights)
        try:
            data = _sample_data(recipe)
        except CompressKitError:   # the model does not need it: only the sample batch is missing then
            data = None
        return model.eval(), recipe, data
    data = _sample_data(recipe)
    model = resolve_model(recipe.model, data.info if data is not None else None)
    sample = sample_inputs(data) if data is not None else None
    model = prepare(model, recipe, total_steps=1, data=data, sample_input=sample).model
    try:
        load_weights(model, read_state_dict(weights), weights)
    except ConfigError as e:   # load_weights names model.checkpoint, which export does not use
        detail = e.message
        raise ConfigError("export", f"{detail}; this run has no {LAYOUT_FILE} (written before layout records), so "
                                    f"export rebuilds it by preparing the recipe's stages, which cannot rebuild a "
                                    f"model whose stages change it in finalize (DASNet): run compresskit apply "
                                    f"again to get a {LAYOUT_FILE}") from None
    return model.eval(), recipe, data


def original_model(run_dir: str | os.PathLike, recipe: Recipe, data: DataBundle | None) -> nn.Module:
    """The model of a run as its recipe builds it before any stage (no weights loaded): from the run's layout
    record where it has one, else from the recipe and its data."""
    layout_file = os.path.join(str(run_dir), LAYOUT_FILE)
    if os.path.isfile(layout_file):
        return _layout_model(read_layout(layout_file))
    return resolve_model(recipe.model, data.info if data is not None else None)


def _layout_model(layout: Layout) -> nn.Module:
    """The model a layout record's factory and arguments build (before any stage)."""
    return resolve_model(ModelConfig(name=layout.model, args=layout.model_args))


def _sample_data(recipe: Recipe) -> DataBundle | None:
    """The run's data (for the sample batch), or None when the recipe names none."""
    seed = recipe.train.seed if recipe.train else 0
    return resolve_data(recipe.data, seed) if recipe.data is not None else None


def _saved_recipe(report: str) -> dict[str, Any]:
    """The raw recipe a run's ``report.json`` holds (without ``model.checkpoint``), or a one-line error."""
    if not os.path.isfile(report):
        raise ConfigError("RUN_DIR", f"no report.json in {shorten(os.path.dirname(report))}: not the output folder "
                                     f"of a compresskit apply run")
    try:
        with open(report, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(report, f"not readable JSON ({first_line(e, 120)})") from None
    raw = content.get("recipe") if isinstance(content, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(report, "holds no recipe (a run started from Python without one?): export needs the "
                                  "recipe that built the model; rebuild the model yourself and call "
                                  "compresskit.export.to_state_dict / save_packed / export_program")
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("model"), dict):
        raw["model"].pop("checkpoint", None)
    return raw


def output_path(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Where ``compresskit export`` writes ``fmt``: ``out`` (a file, or a folder to put the default name in), by
    default ``RUN_DIR/<DEFAULT_NAMES[fmt]>``."""
    if out is None:
        return Path(run_dir) / DEFAULT_NAMES[fmt]
    return Path(out) / DEFAULT_NAMES[fmt] if os.path.isdir(out) else Path(out)


def _check_fits_original(state: dict[str, torch.Tensor], run_dir: str | os.PathLike, recipe: Recipe,
                         data: DataBundle | None, spec: dict[str, Any] | None = None) -> bool:
    """Whether ``state`` has the keys and shapes of the model the recipe builds before any stage (with the spec's
    packed modules swapped in), checked on the meta device (no memory); a ConfigError when it does not. False when
    the model cannot be built on the meta device (not checked)."""
    try:
        with torch.device("meta"):
            original = original_model(run_dir, recipe, data)
    except (CompressKitError, RuntimeError, NotImplementedError):
        return False
    if spec is not None:
        with torch.device("meta"):
            swap_in_packed(original, spec, "packed spec")
    expected = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or shapes:
        raise ConfigError("export", f"the exported weights do not fit the model the recipe builds "
                                    f"({recipe.model.name}): missing {_few(missing)}; unexpected {_few(unexpected)}; "
                                    f"other shape {_few(shapes)} (a stage changed more than the embedding tables)")
    return True


@torch.no_grad()
def _outputs(model: nn.Module, sample: tuple | None) -> list[torch.Tensor] | None:
    """The model's output tensors on ``sample`` (None without one)."""
    if sample is None:
        return None
    out = model(*sample)
    return [out] if torch.is_tensor(out) else [t for t in out if torch.is_tensor(t)] \
        if isinstance(out, (tuple, list)) else []


def _max_difference(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """``compresskit export``: rebuild the run in ``run_dir`` (:func:`load_run`), convert it to ``fmt`` and write
    it (atomically) to :func:`output_path`. Returns what was done: ``path`` (and the packed ``spec``),
    ``file_bytes``, the packed ``tables`` and ``bytes``, ``fits_original`` (state-dict / packed: keys and shapes
    checked against the recipe's model), ``dynamic_batch`` (torch.export), and ``max_abs_diff`` between the
    exported and the run's model on the sample batch (the first test rows; None without data)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"got {shorten(fmt)}, expected one of {', '.join(FORMATS)}")
    path = output_path(run_dir, fmt, out)
    if fmt == "packed":
        spec_path(path)   # a bad name fails before the slow part
    model, recipe, data = load_run(run_dir)
    sample = sample_inputs(data) if data is not None else None
    if fmt == "torch.export" and sample is None:
        if recipe.data is not None:
            _sample_data(recipe)      # the data could not be read: its own one-line error says why
        raise ConfigError("--format", "torch.export needs a sample batch, and the run's recipe names no data")
    prepare_output_dir(str(path.parent))
    reference = _outputs(model, sample)
    summary: dict[str, Any] = {"format": fmt, "path": str(path), "rows": None if sample is None else
                               next((int(t.shape[0]) for t in sample if torch.is_tensor(t)), None)}
    if fmt == "state-dict":
        state = to_state_dict(model)
        model.eval()             # the converted modules are new: the same mode as the run's model
        summary["fits_original"] = _check_fits_original(state, run_dir, recipe, data)
        integrity.save(path, state)
        exported = _outputs(model, sample)
    elif fmt == "packed":
        spec = pack(model)
        summary["fits_original"] = _check_fits_original(model.state_dict(), run_dir, recipe, data, spec)
        write_packed(model, spec, path)
        model.eval()
        summary.update(spec=str(spec_path(path)), tables=spec["tables"], bytes=spec["bytes"])
        exported = _outputs(model, sample)
    else:
        program = export_program(model, sample)
        save_program(program, path)
        summary["dynamic_batch"] = batch_is_dynamic(program)
        exported = _outputs(program.module(), sample)
    summary["file_bytes"] = os.path.getsize(path)
    summary["max_abs_diff"] = _max_difference(reference, exported)
    return summary


def check_export(run_dir: str | os.PathLike, path: str | os.PathLike) -> dict[str, Any]:
    """``compresskit check-export``: load an exported file as a serving process would, in a model built from the
    run's recipe (never from ``model.pt``), and compare its outputs on the sample batch with the run's model. The
    format follows the file: ``.pt2`` (:func:`load_program`), a packed file with its JSON spec
    (:func:`load_packed`), else a state dict (strict). Returns ``format``, ``rows`` and ``max_abs_diff``; every
    failure (checksum, format version, tables that do not fit, an unregistered op) is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "file not found")
    reference, recipe, data = load_run(run_dir)
    sample = sample_inputs(data) if data is not None else None
    if sample is None:
        raise ConfigError("RUN_DIR", "the run's recipe names no data: there is no sample batch to check with")
    if path.suffix == ".pt2":
        fmt, model = "torch.export", load_program(path).module()
    else:
        model = original_model(run_dir, recipe, data).eval()
        if path.with_suffix(".json").is_file() and path.suffix != ".json":
            fmt = "packed"
            load_packed(model, path)
        else:
            fmt = "state-dict"
            _load_strict(model, read_state_dict(str(path)), str(path))
    return {"format": fmt, "path": str(path), "rows": next((int(t.shape[0]) for t in sample if torch.is_tensor(t)),
                                                            None),
            "max_abs_diff": _max_difference(_outputs(reference, sample), _outputs(model, sample))}
