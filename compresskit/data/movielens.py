"""MovieLens-100K loader from the original GroupLens files (``u.data``, ``u.user``, ``u.item``).

Label: rating >= 4. Sparse features: user, item, gender, occupation, zip-code prefix, age bucket.
Dense features: standardised age, release year and the 19 genre flags.

A bad record raises :class:`~compresskit.errors.DataError` naming its file and line.
"""
from __future__ import annotations

import os
import re
from typing import Annotated

import torch

from ..errors import DataError, shorten
from ..schema import Range
from . import DataBundle, bundle_from_tensors, register_dataset
from .tabular import encode_categorical, parse_number, read_lines, separator_name, split_fields, standardize

DATA_FIELDS = ("user id", "item id", "rating", "timestamp")
USER_FIELDS = ("user id", "age", "gender", "occupation", "zip code")
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
ITEM_FIELDS = ("movie id", "title", "release date", "video release date", "IMDb URL") + GENRES
_DATE = re.compile(r"\d{1,2}-[A-Za-z]{3}-(\d{4})")
_DEFAULT_YEAR = 1995   # u.item leaves one release date empty


def _read_table(path: str, sep: str, fields: tuple[str, ...], what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each record of an ml-100k file; a wrong field count names the line."""
    hint = f"MovieLens-100K's {os.path.basename(path)} is {separator_name(sep)}-separated"
    names = ", ".join(fields[:5]) + (f", {len(fields) - 5} genre flags" if len(fields) > 5 else "")
    return [(n, split_fields(line, sep, len(fields), path, n, hint, names))
            for n, line in read_lines(path, what, encoding="latin-1", sep=sep)]


def _by_id(rows: list[tuple[int, list[str]]], path: str, kind: str) -> dict[str, tuple[int, list[str]]]:
    """Records keyed by their first field (the id); a missing or repeated id raises DataError."""
    table: dict[str, tuple[int, list[str]]] = {}
    for n, r in rows:
        if not r[0].strip():
            raise DataError(path, n, f"{kind} id is empty; expected a unique {kind} id in the first field")
        if r[0] in table:
            raise DataError(path, n, f"{kind} id {shorten(r[0])} repeats line {table[r[0]][0]}; expected each "
                                     f"{kind} id once")
        table[r[0]] = (n, r)
    return table


def _lookup(table: dict[str, tuple[int, list[str]]], key: str, kind: str, source: str, path: str,
            lineno: int) -> list[str]:
    """The record of id ``key`` in ``table`` (read from file ``source``), else DataError at ``path`` line."""
    if key not in table:
        what = f"{kind} id {shorten(key)} is not in {source}" if key else f"{kind} id is empty"
        raise DataError(path, lineno, f"{what}; expected one of the {len(table)} {kind} ids listed in {source}")
    return table[key][1]


def _year(date: str, path: str, lineno: int) -> int:
    """Release year of a u.item date like ``01-Jan-1995``; an empty date gets the default year."""
    if not date:
        return _DEFAULT_YEAR
    m = _DATE.fullmatch(date)
    if m is None:
        raise DataError(path, lineno, f"release date is {shorten(date)}; expected a date like 01-Jan-1995 or an "
                                      f"empty field")
    return int(m.group(1))


@register_dataset("movielens-100k", needs_path=True, description="MovieLens-100K (u.data/u.user/u.item), rating>=4",
                  source="https://grouplens.org/datasets/movielens/100k/ (the ml-100k folder)")
def load_movielens(path: str, seed: int = 0, min_rating_positive: Annotated[int, Range(1, 5)] = 4) -> DataBundle:
    """Load ratings joined with user and item side information; a seeded 80/10/10 split.

    Every rating is kept; a malformed record, a rating outside 1..5 or an id missing from u.user/u.item raises
    :class:`DataError` naming its file and line.
    """
    files = {name: os.path.join(path, name) for name in ("u.data", "u.user", "u.item")}
    for file in files.values():
        if not os.path.isfile(file):
            raise DataError(file, None, "file not found; MovieLens-100K needs u.data, u.user and u.item in "
                                        "data.path")
    user_file, item_file, data_file = files["u.user"], files["u.item"], files["u.data"]
    users = _by_id(_read_table(user_file, "|", USER_FIELDS, "one user per line"), user_file, "user")
    items = _by_id(_read_table(item_file, "|", ITEM_FIELDS, "one movie per line"), item_file, "item")
    ages = {k: int(parse_number(r[1], user_file, n, "age", integer=True, lo=0)) for k, (n, r) in users.items()}
    item_dense = {k: [float(_year(r[2], item_file, n))]
                  + [parse_number(g, item_file, n, f"genre flag {name}", integer=True, lo=0, hi=1)
                     for g, name in zip(r[5:], GENRES)]
                  for k, (n, r) in items.items()}
    cols: dict[str, list[str]] = {k: [] for k in ("user", "item", "gender", "occupation", "zip", "age_bucket")}
    dense, labels = [], []
    ratings = _read_table(data_file, "\t", DATA_FIELDS, "one rating per line")
    for n, (user_id, item_id, rating, _) in ratings:
        u = _lookup(users, user_id, "user", "u.user", data_file, n)
        _lookup(items, item_id, "item", "u.item", data_file, n)
        stars = parse_number(rating, data_file, n, "rating", integer=True, lo=1, hi=5)
        age = ages[user_id]
        cols["user"].append(user_id)
        cols["item"].append(item_id)
        cols["gender"].append(u[2])
        cols["occupation"].append(u[3])
        cols["zip"].append(u[4][:3])
        cols["age_bucket"].append(str(min(age // 10, 6)))
        dense.append([float(age)] + item_dense[item_id])
        labels.append(1.0 if stars >= min_rating_positive else 0.0)
    encoded, cards = zip(*(encode_categorical(v) for v in cols.values()))
    sparse = torch.stack(encoded, dim=1)
    dense_t = torch.tensor(dense, dtype=torch.float32)
    dense_t[:, :2] = standardize(dense_t[:, :2])
    info = {"num_dense": dense_t.shape[1], "cardinalities": list(cards), "sparse_names": list(cols),
            "source": "movielens-100k"}
    return bundle_from_tensors((dense_t, sparse, torch.tensor(labels)), "binary", info, seed)
