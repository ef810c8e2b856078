"""``method: dense``: the original tables, unchanged (the reference every method is compared against)."""
from __future__ import annotations

from .base import TableMethod


class Dense(TableMethod):
    """Keeps the dense tables (``replace`` returns None), so a run measures them the way it measures the others."""

    name = "dense"
