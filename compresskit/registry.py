"""Registries: one :class:`Registry` type for plugins, models, datasets and HyPar's paper networks.

Plugins (built-in and third-party alike) come from the ``compresskit.plugins`` entry-point group; a package
declares ``[project.entry-points."compresskit.plugins"] myplugin = "mypkg:MyPlugin"``. The core imports no plugin.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from .errors import ConfigError, shorten
from .plugin import Plugin
from .schema import suggest

T = TypeVar("T")
ENTRY_POINT_GROUP = "compresskit.plugins"


class Registry(Generic[T]):
    """Named entries of one kind; an unknown name is a ConfigError naming the field, a close match and the choices.

    ``populate`` runs once, at the first lookup (imports that register entries, or entry-point loading); ``more``
    names what else the field accepts (appended to the list of choices in errors).
    """

    def __init__(self, kind: str, field: str, populate: Callable[[], None] | None = None, more: str = "") -> None:
        self.kind, self.field, self.more = kind, field, more
        self._entries: dict[str, T] = {}
        self._populate = populate

    def _ready(self) -> dict[str, T]:
        if self._populate is not None:
            populate, self._populate = self._populate, None   # cleared first: populating calls add()
            try:
                populate()
            except BaseException:
                self._populate = populate
                raise
        return self._entries

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a different entry under a taken name is an error."""
        self._ready()                                          # built-ins first, so a clash shows at once
        existing = self._entries.get(name)
        if existing is not None and existing is not entry:
            raise ValueError(f"{self.kind} name '{name}' is taken by {existing!r}")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, path: str | None = None) -> T:
        """The entry called ``name``; ``path`` (default: the registry's field) is the recipe field for errors."""
        entries = self._ready()
        if name not in entries:
            raise unknown_name(self.kind, name, entries, path or self.field, self.more)
        return entries[name]

    def items(self) -> dict[str, T]:
        """All entries, sorted by name."""
        return dict(sorted(self._ready().items()))

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def __iter__(self) -> Iterator[str]:
        return iter(self.items())


def unknown_name(kind: str, name: str, choices: Iterable[str], path: str, more: str = "") -> ConfigError:
    """The one 'unknown <kind>' error: the value, the closest choice and all choices."""
    names = sorted(choices)
    listed = ", ".join(names) + (f", {more}" if more else "")
    return ConfigError(path, f"unknown {kind} {shorten(str(name))}{suggest(str(name), names)}; available: {listed}")


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:    # a broken package must not take the others (and every CLI command) down: its name reports it
            cls = ep.load()
        except Exception as e:
            BROKEN_PLUGINS[ep.name] = f"cannot load {ep.value}: {type(e).__name__}: {e}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            BROKEN_PLUGINS[ep.name] = f"{ep.value} is not a compresskit.Plugin subclass"
            continue
        if not cls.name:
            cls.name = ep.name
        PLUGINS.add(cls.name, cls)


PLUGINS: Registry[type[Plugin]] = Registry("plugin", "plugin", _load_entry_points)
BROKEN_PLUGINS: dict[str, str] = {}   # entry-point name -> why it could not be loaded


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name`` (entry points do this for packages)."""
    if not cls.name:
        raise ValueError(f"plugin class {cls.__name__} has no name")
    return PLUGINS.add(cls.name, cls)


def available_plugins() -> dict[str, type[Plugin]]:
    """All registered plugins, from entry points and :func:`register_plugin`, by name."""
    return PLUGINS.items()


def get_plugin(name: str, path: str = "plugin") -> type[Plugin]:
    """The plugin class registered as ``name``; a ConfigError with a close-match suggestion otherwise."""
    if name in BROKEN_PLUGINS and name not in available_plugins():
        raise ConfigError(path, f"plugin '{name}' is installed but broken: {BROKEN_PLUGINS[name]}")
    if not available_plugins():
        raise ConfigError(path, f"no plugins are registered, so '{name}' is unknown: the '{ENTRY_POINT_GROUP}' entry "
                                f"points are missing (install compresskit: pip install -e .)")
    return PLUGINS.get(name, path)


def plugin_for_config(config: object) -> type[Plugin]:
    """The plugin whose ``Config`` class ``config`` is an instance of."""
    for cls in available_plugins().values():
        if type(config) is getattr(cls, "Config", None):
            return cls
    raise ConfigError("config", f"{type(config).__name__} is not the Config of any registered plugin "
                                f"({', '.join(available_plugins())})")
