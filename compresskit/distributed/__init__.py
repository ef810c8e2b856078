"""Scale-out on torch.distributed: ranks and counted collectives, table-wise sharding of embedding tables, data
parallelism for the rest, sharded checkpoints and the launcher (see docs/distributed.md)."""
from __future__ import annotations

import os
from typing import Any

__all__ = ["Collective", "launched_world"]


def launched_world() -> int:
    """Processes of the torchrun launch this process belongs to (1 when not launched by torchrun); reads the
    launcher's environment only, so the CLI can ask before torch is imported."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def __getattr__(name: str) -> Any:
    if name == "Collective":
        from .collective import Collective

        return Collective
    raise AttributeError(f"module 'compresskit.distributed' has no attribute '{name}'")
