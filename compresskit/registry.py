"""Plugin registry: name -> plugin class, for built-ins and for third-party packages via entry points.

A third-party package declares ``[project.entry-points."compresskit.plugins"] myplugin = "mypkg:MyPlugin"``.
"""
from __future__ import annotations

from importlib.metadata import entry_points

from .errors import ConfigError
from .plugin import Plugin
from .schema import suggest

ENTRY_POINT_GROUP = "compresskit.plugins"
_PLUGINS: dict[str, type[Plugin]] = {}
_entry_points_loaded = False


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"plugin class {cls.__name__} has no name")
    existing = _PLUGINS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"plugin name '{cls.name}' is taken by {existing.__module__}.{existing.__name__}")
    _PLUGINS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    from .plugins import dasnet, fiited, hypar  # noqa: F401  (importing registers them)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError(f"entry point {ep.name}", f"{ep.value} is not a compresskit.Plugin subclass")
        if not cls.name:
            cls.name = ep.name
        register_plugin(cls)


def available_plugins() -> dict[str, type[Plugin]]:
    """All registered plugins, built-in and third-party, by name."""
    _load_builtins()
    _load_entry_points()
    return dict(sorted(_PLUGINS.items()))


def get_plugin(name: str, path: str = "plugin") -> type[Plugin]:
    """The plugin class registered as ``name``; a ConfigError with a close-match suggestion otherwise."""
    plugins = available_plugins()
    if name not in plugins:
        raise ConfigError(path, f"unknown plugin '{name}'{suggest(name, plugins)}; available: {', '.join(plugins)}")
    return plugins[name]
