"""Scale-out on torch.distributed: ranks and counted collectives, table-wise sharding of embedding tables, data
parallelism for the rest, sharded checkpoints and the launcher (see docs/distributed.md)."""
from .collective import Collective

__all__ = ["Collective"]
