"""The interface every ``method`` of a fiited stage implements, and the tables it is handed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import nn

from ....distributed.collective import Collective
from ....errors import ConfigError
from ..importance import WEIGHT_SIGNALS


@dataclass
class TableSet:
    """The tables one call works on: this rank's modules and where they sit among every rank's tables."""

    modules: list[tuple[str, nn.Module]]
    coll: Collective                    # the ranks the call spans (a one-process Collective for per-table rounds)
    ids: list[int]                      # each module's position among the ``num_tables`` the call spans
    num_tables: int
    table_index: Callable[[str], int]   # a table's position in the model's table order (stable seeds)


class TableMethod:
    """How a fiited stage compresses a model's embedding tables: one object per run, chosen by ``method``.

    A method either replaces the dense tables by its own natural form before training (:meth:`replace`: uniform,
    mixed_dim, the hashing family) or, with ``in_training``, lets the stage turn them into FIITED chunk stores and
    then decides what each pruning round keeps (:meth:`track`, :meth:`prune`: fiited, adaembed). Register a new
    one with ``TABLE_METHODS.add(name, cls)`` (``compresskit.plugins.fiited.methods``).
    """

    name: ClassVar[str] = ""
    in_training: ClassVar[bool] = False      # tables become chunk stores pruned during training
    ranks_chunks: ClassVar[bool] = False     # the stage's ``utility`` option ranks this method's chunks
    single_process: ClassVar[bool] = False   # plans over all tables in one process (no --nproc)

    def __init__(self, config: Any, error: Callable[[str, str], ConfigError]) -> None:
        self.config = config
        self.error = error      # ConfigError naming a field of the stage (``stages[0].<field>: ...``)

    @classmethod
    def check(cls, config: Any, path: str) -> None:
        """Refuse (ConfigError) stage options this method cannot take; ``path`` is the stage's place."""
        if config.utility != "gradient" and not cls.ranks_chunks:
            raise ConfigError(f"{path}.utility", f"got '{config.utility}': it ranks FIITED's chunks, and method is "
                                                 f"'{config.method}'")
        if config.utility in WEIGHT_SIGNALS and config.regrow and not config.lazy:
            raise ConfigError(f"{path}.utility", f"got '{config.utility}' with regrow: true; a pruned chunk has no "
                                                 f"weights to rank it by (use gradient or per_access)")
        if config.lazy and not cls.in_training:
            raise ConfigError(f"{path}.lazy", f"lazy allocation needs an in-training method, not '{config.method}'")
        if config.precision.storage != "fp32" and not cls.in_training:
            raise ConfigError(f"{path}.precision.storage", f"got '{config.precision.storage}': quantized chunks "
                                                           f"need a chunk store (method fiited or adaembed), not "
                                                           f"'{config.method}'")

    # --------------------------------------------------------------------------- before training (natural forms)
    def replace(self, model: nn.Module, tables: TableSet, budget_bytes: int, ctx: Any) -> list[nn.Module] | None:
        """This method's twins of the dense ``tables`` within ``budget_bytes`` over every rank (ValueError when
        the budget cannot hold them), or None to keep the dense tables. Called for methods not ``in_training``."""
        return None

    # --------------------------------------------------------------------------------- during training (stores)
    def track(self, table: nn.Module) -> None:
        """Set up what a FIITED table records in backward for this method's rounds (utilities, candidates)."""

    @property
    def adaptive(self) -> bool:
        """Whether rounds go on after the target is reached (the allocation never freezes)."""
        return False

    def prune(self, target: int, tables: TableSet) -> int | None:
        """Bring ``tables`` to ``target`` stored chunks over ``tables.coll``'s ranks. Returns the rows that gained
        chunks, or None when nothing changed. A collective: every rank calls it."""
        raise NotImplementedError
