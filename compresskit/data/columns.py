"""Loaders for a user's own tables: ``csv`` (any delimiter, with a header row or named columns) and ``parquet``
(through pyarrow, when it is importable).

The recipe names the label column, the categorical columns (one embedding table each; a ``multi_hot`` column holds
several values split at ``separator``, or a list in Parquet) and the dense (numeric) columns. One file is split
80/10/10 with the run's seed; a folder of train / validation / test files keeps its splits.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from ..errors import ConfigError, DataError, shorten
from ..optional import import_quietly
from ..schema import Range
from . import DataBundle, register_dataset
from .fields import Field, binary_labels, bundle, encode_fields, sparse_info, split_files
from .tabular import read_lines, separator_name, standardize

MISSING = {"", "na", "nan", "null", "none"}       # dense values read as missing (case-insensitive)
PARQUET_INSTALL = 'pip install "compresskit[parquet]"'


@dataclass
class Columns:
    """Which columns a table's loader reads, and how (the loader arguments, checked against a header)."""

    label: str
    categorical: list[str] | None
    dense: list[str]
    multi_hot: list[str]
    separator: str
    positive: str | None
    positive_above: float | None
    min_count: int
    dense_transform: str

    def resolve(self, header: list[str], file: str) -> list[str]:
        """The categorical columns, every named column checked against ``header`` (DataError naming the file)."""
        categorical = self.categorical if self.categorical is not None else \
            [c for c in header if c != self.label and c not in self.dense]
        for arg, names in (("label", [self.label]), ("categorical", categorical), ("dense", self.dense),
                           ("multi_hot", self.multi_hot)):
            absent = [n for n in names if n not in header]
            if absent:
                raise DataError(file, None, f"has no column {', '.join(map(repr, absent))} (data.args.{arg}); its "
                                            f"columns are {shorten(', '.join(header), 300)}")
        both = sorted(set(categorical) & set(self.dense))
        if both or self.label in categorical or self.label in self.dense:
            name = both[0] if both else self.label
            raise ConfigError("data.args", f"column {name!r} is named twice (label, categorical, dense); give each "
                                           f"column one role")
        stray = [c for c in self.multi_hot if c not in categorical]
        if stray:
            raise ConfigError("data.args.multi_hot", f"{stray[0]!r} is not a categorical column; multi_hot lists "
                                                     f"categorical columns that hold several values")
        if not categorical:
            raise ConfigError("data.args.categorical", "no categorical column left; a recommendation model needs at "
                                                       "least one (name them in data.args.categorical)")
        return categorical

    def bundle(self, header: list[str], records: list[tuple[str, int, str | None, list[Any]]], unit: str,
               seed: int, source: str) -> DataBundle:
        """A DataBundle of ``(file, line, split, values)`` records whose values follow ``header``."""
        categorical = self.resolve(header, records[0][0])
        at = {name: i for i, name in enumerate(header)}
        fields = [self._field(name, [r[3][at[name]] for r in records]) for name in categorical]
        dense_rows = [[self._number(values[at[c]], c, file, line, unit) for c in self.dense]
                      for file, line, _, values in records]
        sparse, weights, cards = encode_fields(fields, self.min_count)
        labels = binary_labels([(_label_text(r[3][at[self.label]]), r[1], r[0]) for r in records], self.positive,
                               self.positive_above, self.label, unit)
        dense = self._transform(torch.tensor(dense_rows, dtype=torch.float64).reshape(len(records), len(self.dense)))
        info = {"num_dense": len(self.dense), "dense_names": list(self.dense),
                **sparse_info(sparse, weights, categorical, cards), "source": source}
        tensors = (dense, sparse) + ((weights,) if weights is not None else ()) + (labels,)
        parts = [r[2] for r in records] if records[0][2] is not None else None
        return bundle(tensors, parts, info, seed, records[0][0])

    def _field(self, column: str, cells: list[Any]) -> Field:
        """A categorical column's cells as a field: bags for a ``multi_hot`` or list column, else one value a row
        (a missing cell: '', the out-of-vocabulary id)."""
        if column in self.multi_hot or any(isinstance(c, (list, tuple)) for c in cells):
            fld = Field(column)
            for cell in cells:
                fld.add(self._bag(cell, column))
            return fld
        return Field(column, ["" if c is None else str(c) for c in cells], single=True)

    def _bag(self, value: Any, column: str) -> list[str]:
        """A cell of a bag column as its values: a list cell's items, a multi-hot text split at the separator
        (empty parts dropped), a missing cell none; a single value of a list column as itself."""
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value if v is not None]
        if value is None:             # a missing bag is empty, as an empty list or an empty multi-hot cell
            return []
        text = str(value)
        if column in self.multi_hot:
            return [p for p in (s.strip() for s in text.split(self.separator)) if p]
        return [text]

    @staticmethod
    def _number(value: Any, column: str, file: str, line: int, unit: str) -> float:
        """A dense cell as a float; missing (empty, NA, NaN, null) as NaN, filled with the column mean later."""
        if value is None or (isinstance(value, str) and value.strip().lower() in MISSING):
            return math.nan
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(file, line, f"{column} is {shorten(str(value))}; expected a number or an empty cell "
                                        f"(data.args.dense lists it as dense)", unit) from None
        if math.isinf(number):
            raise DataError(file, line, f"{column} is {shorten(str(value))}; expected a finite number", unit)
        return number

    def _transform(self, dense: torch.Tensor) -> torch.Tensor:
        """Missing values filled with the column mean, then ``dense_transform``: ``standardize`` (zero mean, unit
        variance) or ``log`` (sign(x) log(1 + |x|) first, for heavy-tailed counts)."""
        if dense.shape[1] == 0:
            return dense.float()
        if self.dense_transform == "log":
            dense = dense.sign() * dense.abs().log1p()
        means = dense.nanmean(0).nan_to_num(0.0)
        dense = torch.where(dense.isnan(), means, dense)
        return standardize(dense.float())


def _label_text(value: Any) -> str:
    """A label cell as text: missing as '', a boolean (Parquet) as 1/0."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _columns(label, categorical, dense, multi_hot, separator, positive, positive_above, min_count,
             dense_transform) -> Columns:
    if positive is not None and positive_above is not None:
        raise ConfigError("data.args.positive", "give positive (the positive class's text) or positive_above (a "
                                                "numeric threshold), not both")
    if not separator:
        raise ConfigError("data.args.separator", "is empty; expected the text between a multi-hot cell's values, "
                                                 "e.g. '|'")
    return Columns(label, list(categorical) if categorical is not None else None, list(dense or []),
                   list(multi_hot or []), separator, positive, positive_above, min_count, dense_transform)


def _csv_records(file: str, split: str | None, delimiter: str, names: list[str] | None, max_rows: int | None
                 ) -> tuple[list[str], list[tuple[str, int, str | None, list[Any]]]]:
    """The header (``names``, or the first row) and the records of one CSV file."""
    what = f"{separator_name(delimiter)}-separated rows with a header"
    header, records = names, []
    csv.field_size_limit(2**31 - 1)           # long multi-hot cells (a user's history) are one field
    for line, text in read_lines(file, what, sep=delimiter):
        if line == 1:
            text = text.removeprefix("\ufeff")        # the byte-order mark of spreadsheet exports
        try:
            row = next(csv.reader([text], delimiter=delimiter))
        except csv.Error as e:
            raise DataError(file, line, f"not a {separator_name(delimiter)}-separated row ({e})") from None
        if header is None:
            header = [c.strip() for c in row]
            continue
        if max_rows is not None and len(records) >= max_rows:
            break
        if len(row) != len(header):
            raise DataError(file, line, f"expected {len(header)} {separator_name(delimiter)}-separated fields "
                                        f"({shorten(', '.join(header), 120)}), got {len(row)} ({shorten(text)})")
        records.append((file, line, split, [c.strip() for c in row]))
    if not records:
        raise DataError(file, None, f"no data rows; expected {what}")
    return header, records


def _read_all(path: str, kind: str, read, whole_folder: bool = False) -> tuple[list[str], list]:
    """Header and records of the dataset at ``path`` (one file, or split files with the same header)."""
    header: list[str] | None = None
    records: list = []
    for split, file in split_files(path, kind, whole_folder):
        names, rows = read(file, split)
        if header is not None and names != header:
            raise DataError(file, None, f"columns {shorten(', '.join(names), 200)} differ from the train file's "
                                        f"{shorten(', '.join(header), 200)}; every split needs the same columns")
        header = names
        records += rows
    return header or [], records


@register_dataset("csv", needs_path=True, description="your CSV/TSV: label, categorical (multi-hot) and dense columns",
                  source="your own file(s): one CSV, or a folder of train / validation / test CSVs")
def load_csv(path: str, seed: int = 0, label: str = "label", categorical: list[str] | None = None,
             dense: list[str] | None = None, multi_hot: list[str] | None = None, separator: str = "|",
             delimiter: str = ",", columns: list[str] | None = None, positive: str | None = None,
             positive_above: float | None = None, min_count: Annotated[int, Range(1)] = 1,
             max_rows: Annotated[int, Range(1)] | None = None,
             dense_transform: Literal["standardize", "log"] = "standardize") -> DataBundle:
    """Load a delimited text table.

    ``label``: the label column (0/1 or -1/+1; else ``positive`` names the positive class's text or
    ``positive_above`` thresholds a number); ``categorical``: columns with an embedding table each (default: every
    column but the label and the dense ones); ``multi_hot``: categorical columns holding several values split at
    ``separator``; ``dense``: numeric columns (missing cells: the column mean), standardised after
    ``dense_transform``; ``columns``: names of a file without a header row; ``delimiter``: one character (``"\\t"``
    for TSV); ``min_count``: rarer values share id 0; ``max_rows``: per file. A bad row raises :class:`DataError`
    naming the file and line.
    """
    if len(delimiter) != 1:
        raise ConfigError("data.args.delimiter", f"is {delimiter!r}; expected one character, e.g. ',' or '\\t'")
    spec = _columns(label, categorical, dense, multi_hot, separator, positive, positive_above, min_count,
                    dense_transform)
    header, records = _read_all(path, "csv", lambda file, split: _csv_records(file, split, delimiter, columns,
                                                                              max_rows))
    return spec.bundle(header, records, "line", seed, "csv")


def _parquet_records(file: str, split: str | None, max_rows: int | None
                     ) -> tuple[list[str], list[tuple[str, int, str | None, list[Any]]]]:
    """The column names and the records (row numbers from 1) of one Parquet file."""
    pq, why = import_quietly("pyarrow.parquet")
    if pq is None:
        raise ConfigError("data.name", f"'parquet' needs pyarrow, which {why}: {PARQUET_INSTALL}")
    try:
        table = pq.read_table(file)
    except Exception as e:      # pyarrow raises its own error types for a file that is not Parquet
        raise DataError(file, None, f"cannot read it as Parquet ({shorten(str(e), 160)})") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise DataError(file, None, "no rows; expected a table with the label and feature columns")
    header = list(table.column_names)
    columns = [table.column(c).to_pylist() for c in header]
    return header, [(file, i + 1, split, [col[i] for col in columns]) for i in range(table.num_rows)]


@register_dataset("parquet", needs_path=True, description="your Parquet file(s), columns as for csv (needs pyarrow)",
                  source="your own file(s): one Parquet file, or a folder of train / validation / test files")
def load_parquet(path: str, seed: int = 0, label: str = "label", categorical: list[str] | None = None,
                 dense: list[str] | None = None, multi_hot: list[str] | None = None, separator: str = "|",
                 positive: str | None = None, positive_above: float | None = None,
                 min_count: Annotated[int, Range(1)] = 1, max_rows: Annotated[int, Range(1)] | None = None,
                 dense_transform: Literal["standardize", "log"] = "standardize") -> DataBundle:
    """Load a Parquet table, with the arguments of ``csv``; a list column is multi-hot as it is (a string column
    listed in ``multi_hot`` is split at ``separator``). Errors name the file and row."""
    spec = _columns(label, categorical, dense, multi_hot, separator, positive, positive_above, min_count,
                    dense_transform)
    header, records = _read_all(path, "parquet", lambda file, split: _parquet_records(file, split, max_rows),
                                True)
    return spec.bundle(header, records, "row", seed, "parquet")
