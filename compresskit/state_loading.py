"""Loads that only give modules the saved shapes: a sharded checkpoint's resume first loads placeholders of the
saved sizes (so modules whose tensors change size, FIITED stores and caches, take them), then writes the real
values in place. Loaders skip checks of the values inside such a load (:func:`adopting_shapes`)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_ADOPTING_SHAPES: contextvars.ContextVar[bool] = contextvars.ContextVar("adopting_shapes", default=False)


@contextlib.contextmanager
def adopting_shapes() -> Iterator[None]:
    """Inside this context a ``load_state_dict`` only adopts shapes: its values are placeholders."""
    token = _ADOPTING_SHAPES.set(True)
    try:
        yield
    finally:
        _ADOPTING_SHAPES.reset(token)


def only_adopting_shapes() -> bool:
    """Whether the current ``load_state_dict`` only adopts shapes (:func:`adopting_shapes`)."""
    return _ADOPTING_SHAPES.get()
