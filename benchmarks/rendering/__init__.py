"""The renderers of ``render_docs.py``, one module per plugin (importing the package registers them all)."""
from . import dasnet, fiited, hypar, tables  # noqa: F401  (registration)
from .core import RENDERERS

__all__ = ["RENDERERS"]
