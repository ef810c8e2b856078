"""User-facing errors: the CLI prints them on one line (``error: <where>: <what>; <what is allowed>``) and exits
with status 2."""
from __future__ import annotations

from typing import Any

MAX_SHOWN = 60   # characters of a value an error message echoes


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr`` of a value cut to ``limit`` characters (a 10 MB string in a recipe is not echoed whole)."""
    text = repr(value[:limit]) if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return text[:limit - 3] + "..." + (f" ({len(value):,} characters)" if isinstance(value, str) else "")


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters (for one-line errors)."""
    line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


# every character str.splitlines() breaks a line at, escaped as in a Python literal
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def key_text(key: object, limit: int = 40) -> str:
    """A mapping key as it appears in a field path: line breaks escaped, cut to ``limit`` characters."""
    text = str(key).translate(_LINE_BREAKS)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str, limit: int = 1000) -> str:
    """A message as the single stderr line the CLI prints (line breaks escaped, cut to ``limit``)."""
    return key_text(message, limit)


class CompressKitError(Exception):
    """Base class of every error a user can fix by changing their input."""


class ConfigError(CompressKitError):
    """A recipe or argument is invalid; the message names the field path, the value and what is allowed."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message        # without the path: what a caller re-raising under another field keeps
        super().__init__(f"{path}: {message}" if path else message)


class DataError(CompressKitError):
    """A data file holds a record the loader cannot read: names the file, the line (``unit``: "row" for a
    columnar file) and what was expected."""

    def __init__(self, file: str, line: int | None, message: str, unit: str = "line") -> None:
        self.file, self.line = file, line
        where = f"{file} {unit} {line}" if line is not None else file
        super().__init__(f"data: {where}: {message}")


class CheckpointError(CompressKitError):
    """A checkpoint or saved model cannot be trusted or does not fit: corrupt, tampered, foreign or mismatched."""

    def __init__(self, file: str, message: str) -> None:
        self.file = file
        super().__init__(f"{file}: {message}")


class OutputError(CompressKitError):
    """The output folder cannot take the run's files (a file in the way, no permission, disk full)."""

    def __init__(self, path: str, message: str) -> None:
        self.file = path
        super().__init__(f"output: '{path}': {message}")
