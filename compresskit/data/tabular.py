"""Helpers shared by the tabular loaders: reading records with their line numbers, parsing fields (a bad one
raises :class:`~compresskit.errors.DataError` naming file and line), categorical vocabularies and standardisation."""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
from collections import Counter
from typing import BinaryIO, Iterator, Sequence

import torch

from ..errors import DataError, shorten

_SEP_NAMES = {"\t": "tab", ",": "comma", "|": "'|'", " ": "space"}


def separator_name(sep: str) -> str:
    """How messages name a field separator: 'tab', 'comma', "'|'"."""
    return _SEP_NAMES.get(sep, repr(sep))


COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def open_maybe_compressed(path: str) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed on the fly when its name ends in ``.gz``, ``.bz2`` or ``.xz``
    (as Criteo's and Avazu's releases ship)."""
    opener = COMPRESSED.get(os.path.splitext(path)[1].lower())
    return opener(path, "rb") if opener is not None else open(path, "rb")


def read_lines(path: str, what: str, *, encoding: str = "utf-8", sep: str = "") -> Iterator[tuple[int, str]]:
    """Yield ``(line number from 1, line without its ending)`` for each record of a text file (``.gz``, ``.bz2``
    and ``.xz`` files are decompressed as they are read).

    Whitespace-only lines (a trailing blank line) are skipped unless they hold ``sep`` (a tab-separated row of
    empty fields is a record). An unreadable file, an undecodable line or a file without any record raises
    :class:`DataError`; ``what`` describes the expected content for that message.
    """
    found = False
    try:
        with open_maybe_compressed(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode(encoding).rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(path, lineno, f"byte {e.start + 1} is not {encoding} text; expected {what} "
                                                  f"in {encoding}") from None
                if line.strip() or (sep and sep in line):
                    found = True
                    yield lineno, line
    except (OSError, EOFError, lzma.LZMAError) as e:   # gzip's BadGzipFile is an OSError; a cut file: EOFError
        raise DataError(path, None, f"cannot read it ({getattr(e, 'strerror', None) or e}); expected a readable "
                                    f"file with {what}") from None
    if not found:
        raise DataError(path, None, f"empty file; expected {what}")


def split_fields(line: str, sep: str, count: int, file: str, lineno: int, hint: str, names: str = "") -> list[str]:
    """``line`` split at ``sep``; not ``count`` fields raises :class:`DataError` naming the line, e.g.
    ``expected 4 tab-separated fields (user id, item id, rating, timestamp), got 1 ('196 242 3'); <hint>``.

    ``names`` lists the expected fields for the message; ``hint`` says what the format allows.
    """
    fields = line.split(sep)
    if len(fields) != count:
        listed = f" ({names})" if names else ""
        raise DataError(file, lineno, f"expected {count} {separator_name(sep)}-separated fields{listed}, "
                                      f"got {len(fields)} ({shorten(line)}); {hint}")
    return fields


def parse_number(text: str, file: str, lineno: int, field: str, *, integer: bool = False,
                 lo: float | None = None, hi: float | None = None) -> float:
    """Field ``text`` as a finite number (an int when ``integer``) within ``[lo, hi]``, else :class:`DataError`
    naming the field, e.g. ``rating is 'x'; expected an integer from 1 to 5``."""
    try:
        value: float | None = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or (not integer and not math.isfinite(value)) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        kind = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            kind += f" from {lo:g} to {hi:g}"
        elif lo is not None:
            kind += f" >= {lo:g}"
        elif hi is not None:
            kind += f" <= {hi:g}"
        raise DataError(file, lineno, f"{field} is {shorten(text)}; expected {kind}")
    return value


def encode_categorical(values: Sequence[str], min_count: int = 1) -> tuple[torch.Tensor, int]:
    """Map string values to contiguous ids by first appearance; values seen < ``min_count`` times (and '') -> id 0.

    Returns (ids int64, cardinality including the shared out-of-vocabulary id 0).
    """
    counts = Counter(values)
    vocab: dict[str, int] = {}
    ids = []
    for v in values:
        if v == "" or counts[v] < min_count:
            ids.append(0)
            continue
        if v not in vocab:
            vocab[v] = len(vocab) + 1
        ids.append(vocab[v])
    return torch.tensor(ids, dtype=torch.long), len(vocab) + 1


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance columns (constant columns become zero)."""
    std = x.std(dim=0, unbiased=False)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
