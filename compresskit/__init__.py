"""compresskit: PyTorch model compression through plugins applied by YAML recipes.

Python API::

    import compresskit
    result = compresskit.apply(model, {"stages": [{"plugin": "fiited", "target_memory_ratio": 0.1}]})
"""
from .allocator import keep_freed_memory
from .api import RunResult, apply, run
from .errors import CompressKitError, ConfigError
from .plugin import Plugin, RunContext
from .recipe import Recipe, load_recipe, validate_recipe
from .registry import available_plugins, get_plugin, register_plugin

__all__ = ["apply", "run", "RunResult", "load_recipe", "validate_recipe", "Recipe", "Plugin", "RunContext",
           "register_plugin", "get_plugin", "available_plugins", "CompressKitError", "ConfigError",
           "keep_freed_memory"]
__version__ = "0.1.0"
