"""Optional packages (torchao, torchrec, tensorboard): imported only where used, and quietly."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

# loggers that optional packages write to at import time on a CPU build (torchao: "Failed to load ... .so" for
# its CUDA-only kernels; torch's pytree: a deprecation note torchao triggers; torch.fx: a note torchrec triggers)
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "torch.fx._symbolic_trace")


def import_quietly(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") where ``name`` imports, else (None, why: ``not installed`` or ``did not import: ...``). Log
    records below ERROR that the import emits are held back."""
    quiet = [logging.getLogger(n) for n in IMPORT_NOISE]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name), ""
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == name.split(".")[0]
        return None, "not installed" if missing else f"did not import: {e}"
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
