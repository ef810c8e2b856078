"""The one config validator: plain dicts (from YAML) -> typed dataclasses, with one-line errors.

Config classes are dataclasses whose fields are declared with :func:`option`, which carries the help text and
numeric bounds. :func:`build` checks unknown keys (with a close-match suggestion), types, bounds and ``Literal``
choices, and names the dotted field path, the bad value and what is allowed in every error.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from typing import Annotated, Any, Callable, Iterable, Literal, Union, get_args, get_origin

from .errors import ConfigError, key_text, shorten

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
    """Declare a config field with help text and optional numeric bounds (``default`` omitted = required)."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    if len(str(word)) > 100:    # difflib is quadratic: a 10 MB typo is not one
        return ""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def describe_type(tp: Any) -> str:
    """Human-readable name of a type annotation, e.g. 'int', 'one of sgd, adam', 'list of int'."""
    origin = get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if not isinstance(a, str) else a for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(describe_type(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin is list:
        return f"list of {describe_type(get_args(tp)[0])}" if get_args(tp) else "list"
    if origin is dict:
        return "mapping"
    if hasattr(tp, "type_name"):
        return tp.type_name
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return the typed value (dataclasses are built recursively)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = get_args(tp)
        value = convert(base, value, path)
        for extra in extras:
            if isinstance(extra, Range):
                _check_bounds(extra.as_meta(), value, path)
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"got {shorten(value)}, expected {describe_type(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            names = [str(a) for a in allowed]
            raise ConfigError(path, f"got {shorten(value)}, expected {describe_type(tp)}{suggest(str(value), names)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {shorten(value)}, expected {describe_type(tp)}")
        (item,) = get_args(tp) or (Any,)
        return [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {shorten(value)}, expected a mapping")
        _, item = get_args(tp) or (Any, Any)
        return {k: convert(item, v, f"{path}.{key_text(k)}") for k, v in value.items()}
    if hasattr(tp, "from_config"):  # a type that validates itself (a recipe stage: plugin name + its config)
        return tp.from_config(value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"got {shorten(value)}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"got {shorten(value)}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"got {shorten(value)}, expected a number")
        try:
            number = float(value)
        except OverflowError:   # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(path, f"got {shorten(value)}, expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"got {shorten(value)}, expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _check_bounds(meta: typing.Mapping[str, Any], value: Any, path: str) -> None:
    if isinstance(value, list):     # bounds of a list field hold for each item
        for i, item in enumerate(value):
            _check_bounds(meta, item, f"{path}[{i}]")
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = meta.get("min"), meta.get("max")
    lo_x, hi_x = meta.get("min_exclusive"), meta.get("max_exclusive")
    bad = (lo is not None and (value <= lo if lo_x else value < lo)) or \
          (hi is not None and (value >= hi if hi_x else value > hi))
    if bad:
        left = "" if lo is None else (f"> {lo}" if lo_x else f">= {lo}")
        right = "" if hi is None else (f"< {hi}" if hi_x else f"<= {hi}")
        rng = " and ".join(p for p in (left, right) if p)
        raise ConfigError(path, f"got {shorten(value)}, expected a value {rng}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Validate mapping ``data`` against dataclass ``cls`` and return an instance."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"got {shorten(data)}, expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{path}.{key_text(key)}" if path else key_text(key)
            raise ConfigError(where, f"unknown key{suggest(str(key), fields)}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(where, f"required field is missing ({f.metadata.get('help', describe_type(hints[name]))})")
            if dataclasses.is_dataclass(hints[name]):  # nested config given as {} default: build its defaults
                kwargs[name] = build(hints[name], {}, where)
            continue
        value = convert(hints[name], data[name], where)
        _check_bounds(f.metadata, value, where)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)
    return obj


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric argument of a model factory or dataset loader: ``Annotated[int, Range(1, 4096)]``.
    :func:`check_call_args` enforces them (for a list, on each item), like :func:`option`'s bounds in configs."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_call_args(fn: Callable[..., Any], args: dict[str, Any], path: str, owner: str,
                    provided: Iterable[str] = (), skip: Iterable[str] = ()) -> dict[str, Any]:
    """Bind ``args`` to ``fn``'s signature without calling it: unknown names (with a suggestion), missing required
    arguments (except those in ``provided``, which the caller fills in), and each given value checked against the
    parameter's annotation and its :class:`Range`. Returns the converted arguments. ``skip``: parameters the caller
    passes itself (not user arguments). Annotations the validator cannot read are not checked."""
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return dict(args)
    for name in skip:
        params.pop(name, None)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:   # an external factory's annotations may not resolve; then only names are checked
        hints = {}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in args:
        if key not in named and not open_ended:
            raise ConfigError(f"{path}.{key_text(key)}", f"unknown argument for {owner}{suggest(str(key), named)}; "
                                               f"allowed: {', '.join(named) or 'none'}")
    provided = set(provided)
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in args
               and n not in provided]
    if missing:
        raise ConfigError(path, f"{owner} needs {', '.join(missing)}")
    out = {}
    for key, value in args.items():
        tp = hints.get(key)
        if tp is None:
            out[key] = value
            continue
        try:
            out[key] = convert(tp, value, f"{path}.{key}")
        except TypeError:   # an annotation the validator has no rule for: left to the callee
            out[key] = value
    return out


def fields_help(cls: type) -> list[dict[str, str]]:
    """One row per config field: name, type, default and help, for `compresskit plugins` and the docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append({"name": f.name, "type": describe_type(hints[f.name]), "default": default,
                     "help": f.metadata.get("help", "")})
    return rows


def to_dict(obj: Any) -> Any:
    """Typed config -> plain dict that :func:`build` takes back (for reports, checkpoints and re-validation)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
