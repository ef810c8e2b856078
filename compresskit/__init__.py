"""compresskit: PyTorch model compression through plugins applied by YAML recipes.

Python API, in your own training loop (see :mod:`compresskit.compression`)::

    compression = compresskit.prepare(model, FiitedConfig(target_memory_ratio=0.1), total_steps=10_000)
    ...  # loss.backward(); compression.after_backward(); optimizer.step(); compression.step()
    model = compression.finalize()

or with the built-in trainer::

    result = compresskit.apply(model, {"stages": [{"plugin": "fiited", "target_memory_ratio": 0.1}]}, data=bundle)
"""
from .allocator import keep_freed_memory
from .api import RunResult, apply, run
from .compression import Compression, prepare
from .errors import CompressKitError, ConfigError
from .plugin import Plugin, RunContext
from .recipe import Recipe, Stage, load_recipe, validate_recipe
from .registry import Registry, available_plugins, get_plugin, register_plugin

__all__ = ["prepare", "Compression", "Stage", "Registry", "apply", "run", "RunResult", "load_recipe", "validate_recipe", "Recipe", "Plugin", "RunContext",
           "register_plugin", "get_plugin", "available_plugins", "CompressKitError", "ConfigError",
           "keep_freed_memory"]
__version__ = "0.1.0"
