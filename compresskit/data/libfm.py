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


def _parse(token: str, file: str, line: int) -> tuple[int | None, str, float]:
    """(field or None, feature, value) of one ``feature:value`` or ``field:feature:value`` token."""
    parts = token.split(":")
    value = float("nan")
    if len(parts) in (2, 3):
        try:
            value = float(parts[-1])
        except ValueError:
            pass
    feature_ok = len(parts) in (2, 3) and parts[-2].isdigit() and (len(parts) == 2 or parts[0].isdigit())
    if not feature_ok or not math.isfinite(value):
        raise DataError(file, line, f"token {shorten(token)} is not feature:value or field:feature:value (feature "
                                    f"and field non-negative integers, value a finite number); each line is {FORMAT}")
    return (int(parts[0]) if len(parts) == 3 else None), parts[-2], value


def _read(file: str, split: str | None, max_rows: int | None, rows: list, forms: dict[bool, tuple[str, int]]
          ) -> None:
    """Append ``(file, line, split, label text, [(field, feature, value), ...])`` per record of ``file``.

    ``forms`` maps each token form seen so far (libFFM or not) to where it was first seen: a second form stops."""
    count = 0
    for line_no, line in read_lines(file, FORMAT):
        if max_rows is not None and count >= max_rows:
            break
        tokens = line.split()
        parsed = [_parse(t, file, line_no) for t in tokens[1:]]
        for ffm in {t[0] is not None for t in parsed}:
            forms.setdefault(ffm, (file, line_no))
            if len(forms) > 1:
                first = forms[not ffm]
                raise DataError(file, line_no, f"mixes feature:value and field:feature:value tokens (the other form "
                                               f"is at {first[0]} line {first[1]}); use one form throughout")
        rows.append((file, line_no, split, tokens[0], parsed))
        count += 1


def _assign_fields(rows: list, boundaries: list[int] | None) -> tuple[list[Field], str]:
    """The fields of the parsed rows (see the module docstring) and how they were found."""
    if any(t[0] is not None for r in rows for t in r[4][:1]):      # libFFM: the field is given per token
        if boundaries is not None:
            raise DataError(rows[0][0], None, "data.args.fields is for feature:value files; this file names each "
                                              "token's field (field:feature:value): drop data.args.fields")
        ids = sorted({t[0] for r in rows for t in r[4]})
        where = {f: i for i, f in enumerate(ids)}
        fields = [Field(f"field{f}") for f in ids]
        for r in rows:
            bags: list[tuple[list[str], list[float]]] = [([], []) for _ in fields]
            for f, feature, value in r[4]:
                bags[where[f]][0].append(feature)
                bags[where[f]][1].append(value)
            for fld, (vals, ws) in zip(fields, bags):
                fld.add(vals, ws)
        return fields, "libFFM field numbers"
    if boundaries is not None:
        fields = [Field(f"field{i}") for i in range(len(boundaries))]
        for file, line, _, _, tokens in rows:
            bags = [([], []) for _ in fields]
            for _, feature, value in tokens:
                k = bisect.bisect_right(boundaries, int(feature)) - 1
                if k < 0:
                    raise DataError(file, line, f"feature {feature} is below the first field's start "
                                                f"{boundaries[0]} (data.args.fields)")
                bags[k][0].append(feature)
                bags[k][1].append(value)
            for fld, (vals, ws) in zip(fields, bags):
                fld.add(vals, ws)
        return fields, "data.args.fields"
    counts = {len(r[4]) for r in rows}
    if len(counts) != 1 or 0 in counts:
        low, high = min(counts), max(counts)
        example = next(r for r in rows if len(r[4]) != len(rows[0][4])) if len(counts) > 1 else rows[0]
        raise DataError(example[0], example[1], f"rows hold {low} to {high} features, so fields cannot be taken by "
                                                f"position; give data.args.fields, the first feature index of each "
                                                f"field in ascending order (e.g. [0, 451, 4149])")
    fields = [Field(f"field{i}") for i in range(counts.pop())]
    for r in rows:
        for fld, (_, feature, value) in zip(fields, r[4]):
            fld.add([feature], [value])
    return fields, "position"


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
    files = split_files(path, "libfm")
    rows: list = []
    forms: dict[bool, tuple[str, int]] = {}
    for split, file in (files.items() if isinstance(files, dict) else [(None, files)]):
        _read(file, split, max_rows, rows, forms)
    found, how = _assign_fields(rows, fields)
    sparse, weights, cards = encode_fields(found, min_count)
    labels = binary_labels([(r[3], r[1], r[0]) for r in rows], None, positive_above)
    info = {"num_dense": 0, **sparse_info(sparse, weights, [f.name for f in found], cards), "source": "libfm",
            "fields_from": how}
    tensors = (torch.zeros(len(rows), 0), sparse) + ((weights,) if weights is not None else ()) + (labels,)
    return bundle(tensors, [r[2] for r in rows] if isinstance(files, dict) else None, info, seed)
