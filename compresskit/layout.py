"""The layout record of a run: which model was built and which modules the stages put into it.

``compresskit apply`` writes ``layout.json`` next to ``model.pt``: the model factory and its full arguments (data
derived ones filled in), and one :class:`ModuleRecord` per module a stage swapped in or wrapped (a FIITED table,
a uniform / mixed-dim baseline, DASNet's WTA wrapper and sparse twins, an int8 Linear), in module order. A record
is *applied*, never recomputed (as TorchRec applies a ``ShardingPlan``): :func:`apply_layout` builds the model and
swaps each recorded module in with its class's ``from_record``, with no data, no training and no timing, and
``model.pt`` then loads into the result. That is how ``compresskit export`` and ``check-export`` rebuild a run.

A module takes part by having the two methods of :class:`Recordable`. ``record_args()`` returns JSON-serialisable
arguments; ``from_record(model, name, args)`` returns the module to put at ``name`` of ``model`` (whose module
there is what the record found before the stage ran: the dense table, the activation, the plain conv), shapes
and options from ``args``; the weights come from the state dict afterwards.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .atomic import write_json
from .errors import CheckpointError, first_line, shorten

LAYOUT_FILE = "layout.json"
LAYOUT_FORMAT = "compresskit-layout"
LAYOUT_VERSION = 1
_TAG = "_compresskit_layout"   # where tag() keeps an in-place change's record on the module


@runtime_checkable
class Recordable(Protocol):
    """A module a stage puts into a model that the layout record can put there again."""

    def record_args(self) -> dict[str, Any]:
        """JSON-serialisable arguments :meth:`from_record` rebuilds this module from (not its weights)."""

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> nn.Module:
        """The module to put at ``name`` of ``model`` (which holds, there, the module this one replaced)."""


@dataclass(frozen=True)
class ModuleRecord:
    """One module of the run's model that a stage put there: its name, its class and what rebuilds it."""

    module: str
    cls: str                      # 'compresskit.pkg.module:Class', a Recordable
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Layout:
    """The model a run built (factory ``model`` with ``model_args``) and the modules its stages put into it."""

    model: str
    model_args: dict[str, Any]
    modules: list[ModuleRecord]

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``layout.json`` holds."""
        return {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "model": self.model,
                "model_args": self.model_args,
                "modules": [{"module": r.module, "class": r.cls, "args": r.args} for r in self.modules]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Layout":
        """Parse a ``layout.json`` object; one-line CheckpointError (naming ``where``) for anything else."""
        if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
            raise CheckpointError(where, f"is not a layout record (expected a JSON object with format "
                                         f"'{LAYOUT_FORMAT}')")
        if data.get("version") != LAYOUT_VERSION:
            raise CheckpointError(where, f"layout version {shorten(data.get('version'))}; this compresskit reads "
                                         f"version {LAYOUT_VERSION}")
        modules = data.get("modules")
        if not isinstance(data.get("model"), str) or not isinstance(data.get("model_args"), dict) \
                or not isinstance(modules, list):
            raise CheckpointError(where, "needs 'model' (a name), 'model_args' (an object) and 'modules' (a list)")
        records = []
        for i, entry in enumerate(modules):
            if not isinstance(entry, dict) or not isinstance(entry.get("module"), str) \
                    or not isinstance(entry.get("class"), str) or not isinstance(entry.get("args", {}), dict):
                raise CheckpointError(where, f"modules[{i}]: expected {{'module': name, 'class': "
                                             f"'compresskit.module:Class', 'args': {{...}}}}, got {shorten(entry)}")
            records.append(ModuleRecord(entry["module"], entry["class"], dict(entry.get("args", {}))))
        return cls(data["model"], dict(data["model_args"]), records)


def qualified_name(cls: type) -> str:
    """``'package.module:Class'`` of a class (what a record's ``class`` names)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def tag(module: nn.Module, builder: type, args: dict[str, Any]) -> None:
    """Record a change a stage made to ``module`` in place (no new class, e.g. quantized weights): ``builder``
    (a class with ``from_record``) makes that change again from ``args``."""
    module.__dict__[_TAG] = (qualified_name(builder), dict(args))


def module_records(model: nn.Module) -> list[ModuleRecord]:
    """One record per :class:`Recordable` module of ``model`` and per module a stage tagged (:func:`tag`), in
    module order (outer wrappers before what they wrap, so that :func:`apply_layout` finds each name)."""
    records = []
    for name, m in model.named_modules():
        if isinstance(m, Recordable):
            records.append(ModuleRecord(name, qualified_name(type(m)), m.record_args()))
        elif _TAG in m.__dict__:
            records.append(ModuleRecord(name, *m.__dict__[_TAG]))
    return records


# classes that moved: a record written before the move names the old place
MOVED = {
    "compresskit.plugins.fiited.baselines:NarrowEmbeddingBag": "compresskit.plugins.fiited.natural:NarrowEmbeddingBag",
    "compresskit.plugins.fiited.baselines:MixedDimEmbeddingBag": "compresskit.plugins.fiited.mixed_dim:MixedDimEmbeddingBag",
}


def recordable_class(target: str, where: str) -> type:
    """The class a record names; only compresskit's own modules are imported from a file."""
    module_name, _, qualname = MOVED.get(target, target).partition(":")
    if not qualname or module_name.split(".")[0] != "compresskit":
        raise CheckpointError(where, f"class {shorten(target)}: only compresskit's own 'compresskit.module:Class' "
                                     f"classes are rebuilt from a record")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError, ValueError) as e:
        raise CheckpointError(where, f"class {shorten(target)} not found ({first_line(e, 100)})") from None
    if not (isinstance(cls, type) and callable(getattr(cls, "from_record", None))):
        raise CheckpointError(where, f"class {shorten(target)} cannot be rebuilt from a record (no from_record)")
    return cls


def apply_layout(model: nn.Module, records: list[ModuleRecord], where: str) -> nn.Module:
    """Put every recorded module into ``model`` (in place; a record of the root replaces it), in record order.
    Returns the model; one-line CheckpointError naming ``where`` and the module when one does not fit."""
    for record in records:
        cls = recordable_class(record.cls, where)
        if record.module:
            try:
                model.get_submodule(record.module)
            except AttributeError:
                raise CheckpointError(where, f"module '{record.module}' is not in the {type(model).__name__} the "
                                             f"record builds") from None
        try:
            new = cls.from_record(model, record.module, record.args)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(where, f"module '{record.module}' ({cls.__name__}): {first_line(e, 160)}") from None
        if record.module:
            model.set_submodule(record.module, new)
        else:
            model = new
    return model


def write_layout(path: str | os.PathLike, layout: Layout) -> bool:
    """Write ``layout`` to ``path`` as JSON (atomically). False (nothing written) when its model arguments are
    not JSON (a model passed in from Python: it cannot be rebuilt from a file anyway)."""
    try:
        json.dumps(layout.model_args)
    except (TypeError, ValueError):
        return False
    write_json(path, layout.to_json())
    return True


def read_layout(path: str | os.PathLike) -> Layout:
    """The layout record in ``path``, or a one-line CheckpointError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(str(path), "file not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(str(path), f"not readable JSON ({first_line(e, 120)})") from None
    return Layout.from_json(data, str(path))
