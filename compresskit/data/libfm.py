"""libSVM / libFM / libFFM text loader: ``label feature:value ...`` or ``label field:feature:value ...`` per line.

The format of FM-family CTR datasets (e.g. Frappe and MovieLens-tag as the NFM and AFM papers ship them,
``frappe.train.libfm`` ...) and of LIBSVM's binary-classification files. Every feature is categorical; its value is
the weight of its embedding (FM's ``x_i v_i``), so a file whose values are all 1 trains plain lookups.

Fields (one embedding table each) come from, in order:
- ``field:feature:value`` triples (libFFM): the field number;
- ``data.args.fields``: the first feature index of each field, ascending (``[0, 451, 4149]``: features 0-450 are
  field 0, ...); a row may then hold several features of a field (a bag) or none;
- neither: by position, when every row holds the same number of features (one per field, in the same order, as in
  Frappe); otherwise the loader stops and asks for ``fields``.
"""
from __future__ import annotations

import bisect
import math
from typing import Annotated

import torch

from ..errors import DataError, shorten
from ..schema import Range
from . import DataBundle, register_dataset
from .fields import Field, binary_labels, bundle, encode_fields, sparse_info, split_files
from .tabular import read_lines

FORMAT = "label feature:value ... (libSVM/libFM) or label field:feature:value ... (libFFM), space-separated"


def _index(text: str) -> bool:
    """Whether ``text`` is a non-negative integer in ASCII digits (``str.isdigit`` also takes '²')."""
    return text.isascii() and text.isdecimal()


def _bad_token(token: str, file: str, line: int) -> DataError | None:
    """The error of one token that is not ``feature:value`` or ``field:feature:value``, else None."""
    parts = token.split(":")
    try:
        value = float(parts[-1]) if len(parts) in (2, 3) else math.nan
    except ValueError:
        value = math.nan
    if len(parts) in (2, 3) and _index(parts[-2]) and (len(parts) == 2 or _index(parts[0])) \
            and math.isfinite(value):
        return None
    return DataError(file, line, f"token {shorten(token)} is not feature:value or field:feature:value (feature and "
                                 f"field non-negative integers, value a finite number); each line is {FORMAT}")


def _parse(tokens: list[str], file: str, line: int) -> tuple[list[int] | None, list[str], list[float]]:
    """(fields or None, features, values) of one line's tokens, all ``feature:value`` or all
    ``field:feature:value``; anything else raises :class:`DataError` naming the first bad token."""
    parts = [t.split(":") for t in tokens]
    width = len(parts[0]) if parts else 2
    if width in (2, 3) and all(len(p) == width for p in parts):
        features = [p[-2] for p in parts]
        try:
            values = [1.0 if p[-1] == "1" else float(p[-1]) for p in parts]     # "1": nearly every CTR value
        except ValueError:
            values = [math.nan]
        if all(map(_index, features)) and all(map(math.isfinite, values)) \
                and (width == 2 or all(_index(p[0]) for p in parts)):
            return ([int(p[0]) for p in parts] if width == 3 else None), features, values
    for token in tokens:
        error = _bad_token(token, file, line)
        if error is not None:
            raise error
    raise DataError(file, line, "mixes feature:value and field:feature:value tokens; use one form throughout")


def _read(file: str, split: str | None, max_rows: int | None, rows: list, forms: dict[bool, tuple[str, int]]
          ) -> None:
    """Append ``(file, line, split, label text, fields or None, features, values)`` per record of ``file``.

    ``forms`` maps each token form seen so far (libFFM or not) to where it was first seen: a second form stops."""
    count = 0
    for line_no, line in read_lines(file, FORMAT):
        if max_rows is not None and count >= max_rows:
            break
        tokens = line.split()
        fields, features, values = _parse(tokens[1:], file, line_no)
        if features:
            ffm = fields is not None
            forms.setdefault(ffm, (file, line_no))
            if len(forms) > 1:
                first = forms[not ffm]
                raise DataError(file, line_no, f"mixes feature:value and field:feature:value tokens (the other form "
                                               f"is at {first[0]} line {first[1]}); use one form throughout")
        rows.append((file, line_no, split, tokens[0], fields, features, values))
        count += 1


def _bagged(rows: list, count: int, field_of) -> list[Field]:
    """``count`` fields of bags: each row's features grouped by ``field_of(row, position) -> field index``."""
    fields = [Field(f"field{i}") for i in range(count)]
    for r in rows:
        bags: list[tuple[list[str], list[float]]] = [([], []) for _ in fields]
        for position, (feature, value) in enumerate(zip(r[5], r[6])):
            bag = bags[field_of(r, position)]
            bag[0].append(feature)
            bag[1].append(value)
        for fld, (vals, ws) in zip(fields, bags):
            fld.add(vals, ws)
    return fields


def _assign_fields(rows: list, boundaries: list[int] | None) -> tuple[list[Field], str]:
    """The fields of the parsed rows (see the module docstring) and how they were found."""
    if any(r[4] is not None for r in rows):                       # libFFM: the field is given per token
        if boundaries is not None:
            raise DataError(rows[0][0], None, "data.args.fields is for feature:value files; this file names each "
                                              "token's field (field:feature:value): drop data.args.fields")
        ids = sorted({f for r in rows for f in r[4] or ()})
        where = {f: i for i, f in enumerate(ids)}
        fields = _bagged(rows, len(ids), lambda r, p: where[r[4][p]])
        for fld, f in zip(fields, ids):
            fld.name = f"field{f}"
        return fields, "libFFM field numbers"
    if boundaries is not None:
        def field_of(r, p):
            k = bisect.bisect_right(boundaries, int(r[5][p])) - 1
            if k < 0:
                raise DataError(r[0], r[1], f"feature {r[5][p]} is below the first field's start {boundaries[0]} "
                                            f"(data.args.fields)")
            return k
        return _bagged(rows, len(boundaries), field_of), "data.args.fields"
    counts = {len(r[5]) for r in rows}
    if len(counts) != 1 or 0 in counts:
        low, high = min(counts), max(counts)
        example = next(r for r in rows if len(r[5]) != len(rows[0][5])) if len(counts) > 1 else rows[0]
        raise DataError(example[0], example[1], f"rows hold {low} to {high} features, so fields cannot be taken by "
                                                f"position; give data.args.fields, the first feature index of each "
                                                f"field in ascending order (e.g. [0, 451, 4149])")
    columns, weights = list(zip(*(r[5] for r in rows))), list(zip(*(r[6] for r in rows)))
    return [Field(f"field{i}", list(col), None if all(w == 1.0 for w in ws) else list(ws), single=True)
            for i, (col, ws) in enumerate(zip(columns, weights))], "position"


@register_dataset("libfm", needs_path=True, description="libSVM / libFM / libFFM text (label feature:value ...)",
                  source="your own files, or an FM-family release (e.g. frappe.train/validation/test.libfm)")
def load_libfm(path: str, seed: int = 0,
               fields: Annotated[list[int], Range(0, 2**62)] | None = None,
               positive_above: float | None = None,
               min_count: Annotated[int, Range(1)] = 1,
               max_rows: Annotated[int, Range(1)] | None = None) -> DataBundle:
    """Load one libSVM/libFM/libFFM file (a seeded 80/10/10 split) or a folder of train / validation / test files.

    ``fields``: the first feature index of each field (see the module docstring); ``positive_above``: a numeric
    label above it is a click (default: labels are 0/1 or -1/+1); ``min_count``: features seen fewer times share
    id 0; ``max_rows``: read at most this many rows of each file. A malformed token, label or field raises
    :class:`DataError` naming the file and line.
    """
    if fields is not None and (not fields or any(b >= a for a, b in zip(fields[1:], fields))):
        raise DataError(path, None, f"data.args.fields is {shorten(str(fields))}; expected the first feature index "
                                    f"of each field, strictly ascending")
    rows: list = []
    forms: dict[bool, tuple[str, int]] = {}
    for split, file in split_files(path, "libfm"):
        _read(file, split, max_rows, rows, forms)
    found, how = _assign_fields(rows, fields)
    sparse, weights, cards = encode_fields(found, min_count)
    labels = binary_labels([(r[3], r[1], r[0]) for r in rows], None, positive_above)
    info = {"num_dense": 0, **sparse_info(sparse, weights, [f.name for f in found], cards), "source": "libfm",
            "fields_from": how}
    tensors = (torch.zeros(len(rows), 0), sparse) + ((weights,) if weights is not None else ()) + (labels,)
    return bundle(tensors, [r[2] for r in rows] if rows[0][2] is not None else None, info, seed, path)
