"""compresskit: PyTorch model compression through plugins applied by YAML recipes.

Python API, in your own training loop (see :mod:`compresskit.compression`)::

    compression = compresskit.prepare(model, FiitedConfig(target_memory_ratio=0.1), total_steps=10_000)
    ...  # loss.backward(); compression.after_backward(); optimizer.step(); compression.step()
    model = compression.finalize()

or with the built-in trainer::

    result = compresskit.apply(model, {"stages": [{"plugin": "fiited", "target_memory_ratio": 0.1}]}, data=bundle)
"""
from importlib import import_module
from typing import Any

# where each public name lives: imported on first use, so `compresskit validate` does not pay for torch's
_EXPORTS = {
    "keep_freed_memory": "allocator", "RunResult": "api", "apply": "api", "run": "api",
    "Compression": "compression", "prepare": "compression", "CompressKitError": "errors", "ConfigError": "errors",
    "Plugin": "plugin", "RunContext": "plugin", "Recipe": "recipe", "Stage": "recipe", "load_recipe": "recipe",
    "validate_recipe": "recipe", "Registry": "registry", "available_plugins": "registry", "get_plugin": "registry",
    "register_plugin": "registry",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compresskit' has no attribute '{name}'")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
