"""Atomic file output: write to a temporary file in the same folder, then rename over the target."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import OutputError, first_line

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, write: Callable[[str], T]) -> T:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk and rename it over ``path``;
    returns what ``write`` returned. A failure (disk full, no permission) removes the temporary file, leaves any
    previous ``path`` intact and raises :class:`OutputError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        result = write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
    except OSError as e:
        raise OutputError(str(path), f"cannot write it ({e.strerror or e}); any previous version is intact") from None
    except RuntimeError as e:   # torch.save's zip writer reports a short write (disk full) as a RuntimeError
        text = str(e)
        if not any(word in text for word in ("inline_container", "write", "file")):
            raise
        raise OutputError(str(path), f"cannot write it (the write stopped short: disk full or a file size limit? "
                                     f"{first_line(e, 100)}); any previous version is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    atomic_write(path, write)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(path, _w)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic(path, _w)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist") and hasattr(o, "dim"):   # a tensor
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def prepare_output_dir(path: str) -> Path:
    """Create the output folder if needed and prove it takes files, before any work that would be lost (a file
    in the way, a path under a file, no permission, a read-only disk): an :class:`OutputError` otherwise."""
    if not str(path).strip():
        raise OutputError(str(path), "the output folder name is empty; give output.dir or --out a folder")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(str(path), "a file is in the way: the output folder must be a folder; move the file or "
                                     "choose another output.dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(str(path), f"cannot create files there ({e.strerror or e}); choose another output.dir "
                                     f"or fix its permissions") from None
    return folder
