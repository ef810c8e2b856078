"""FIITED's pruning schedule: when rounds run and how much of the dense table each round keeps."""
from __future__ import annotations

from typing import Any


def kept_ratio(step: int, start: int, end: int, target: float, schedule: str) -> float:
    """Fraction of dense chunks to keep at ``step``: 1 before ``start``, ``target`` from ``end`` on, falling in
    between along ``schedule`` (cubic: fast first, as Zhu & Gupta's gradual pruning; or linear)."""
    if step < start:
        return 1.0
    if step >= end or end <= start:
        return target
    progress = (step - start) / (end - start)
    fall = 1 - (1 - progress) ** 3 if schedule == "cubic" else progress
    return 1.0 - (1.0 - target) * fall


def missing_length(cfg: Any, total_steps: int) -> str | None:
    """The config field (``start_fraction`` / ``end_fraction``) that needs the length of training when
    ``total_steps`` is unknown (0), or None when the schedule is fixed."""
    if total_steps > 0 or (cfg.start_step is not None and cfg.end_step is not None):
        return None
    return "start_fraction" if cfg.start_step is None else "end_fraction"


def schedule_bounds(cfg: Any, total_steps: int) -> tuple[int, int]:
    """(first pruning step, step where the target is reached) of a fiited stage's config: the step fields, or
    the fractions of ``total_steps``. At least 1, and ``end >= start``."""
    start = cfg.start_step if cfg.start_step is not None else int(cfg.start_fraction * total_steps)
    end = cfg.end_step if cfg.end_step is not None else int(cfg.end_fraction * total_steps)
    return max(start, 1), max(end, start, 1)


def on_grid(step: int, start: int, end: int, interval: int) -> bool:
    """Whether a pruning round runs at ``step``: every ``interval`` steps from ``start``, and at ``end``."""
    return step >= start and ((step - start) % interval == 0 or step == end)
