"""The hashing family of embedding compressors, each in its natural form and charged what it stores.

These are the field's strongest compressors at high ratios, the baselines FIITED is measured against at equal bytes
(``method:`` of the ``fiited`` stage). Each replaces one ``nn.EmbeddingBag`` / ``nn.Embedding`` (same forward:
1-D ids with offsets, 2-D ids, ``per_sample_weights``, modes 'sum' / 'mean'; or ids of any shape), computes every
row from shared parameters, and is sized by :meth:`from_budget` to a byte budget:

* :class:`HashedEmbeddingBag`, the hashing trick (Weinberger et al., 2009): ``rows`` shared rows, a row id reads
  row ``h(id) mod rows``. Stores ``rows x dim`` values.
* :class:`QREmbeddingBag`, the quotient-remainder trick (Shi et al., KDD 2020; DLRM's ``QREmbeddingBag``): two
  tables, ``E_q[id // c]`` and ``E_r[id % c]``, combined by elementwise product. Different ids never share both
  rows. Stores ``(ceil(n / c) + c) x dim`` values.
* :class:`RobeEmbeddingBag`, ROBE-Z (Desai et al., MLSys 2022): one shared array of ``size`` values; the ``dim /
  block`` blocks of a row are read at hashed offsets ``h(id, j) mod size`` (wrapping around). Stores ``size``
  values.
* :class:`TTEmbeddingBag`, TT-Rec (Yin et al., MLSys 2021): the ``n x dim`` table as a tensor train of three
  cores, ``n <= n1 n2 n3`` and ``dim = d1 d2 d3``: row ``(i1, i2, i3)`` is ``G1[i1] G2[i2] G3[i3]`` (``[d1, r]
  [r, d2, r] [r, d3]``). Stores ``n1 d1 r + n2 r d2 r + n3 r d3`` values.

The hash is a universal one, ``((a * key + b) mod p) mod m`` with ``p = 2**31 - 1`` and ``a``, ``b`` drawn from
the module's ``seed``; its parameters are a saved buffer (``index`` bytes: 8 a parameter). Nothing else is an index.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...table_types import TableBytes
from .natural import _NaturalBase
from .embedding import check_dense, replaced_table

__all__ = ["HashedEmbeddingBag", "QREmbeddingBag", "RobeEmbeddingBag", "TTEmbeddingBag", "HASHED_TABLES",
           "share_budget"]

PRIME = 2**31 - 1
FLOAT_BYTES = 4


def _hash(keys: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """``((a * key + b) mod p) mod m`` for int64 ``keys`` (any non-negative values; reduced mod p first)."""
    return ((keys % PRIME) * a + b) % PRIME % m


class _HashedBase(_NaturalBase):
    """A bag whose rows are computed from shared parameters (:meth:`embed`), pooled as ``nn.EmbeddingBag`` pools."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str, include_last_offset: bool, bag: bool,
                 sparse: bool, seed: int, hashes: int) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        # a in [1, p), b in [0, p), one pair per hash function
        params = torch.stack([torch.randint(1, PRIME, (hashes,), generator=gen),
                              torch.randint(0, PRIME, (hashes,), generator=gen)], 1)
        self.register_buffer("hash_params", params)
        # zero columns: no bytes; gathering from it checks ids inside a traced graph (see forward)
        self.register_buffer("_id_range", torch.zeros(num_embeddings, 0), persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        """``[n, embedding_dim]`` rows of the int64 ``ids``."""
        raise NotImplementedError

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag`` / ``nn.Embedding`` forward (see the module docstring)."""
        self._check_args(input, offsets, per_sample_weights)
        if torch.compiler.is_compiling():   # a hash maps any id into range: keep an id check in the exported graph
            input = input + F.embedding(input, self._id_range).sum(-1).to(input.dtype)
        if not self.bag:
            return self.embed(input.reshape(-1).long()).view(*input.shape, self.embedding_dim)
        ids, bag_of, weights, bags = self._flatten(input, offsets, per_sample_weights)
        vec = self.embed(ids.long())
        if weights is not None:
            vec = vec * weights.to(vec.dtype)[:, None]
        return vec.new_zeros(bags, self.embedding_dim).index_add(0, bag_of, vec)

    @torch.no_grad()
    def to_dense(self) -> nn.EmbeddingBag | nn.Embedding:
        """The dense equivalent (same options): every row computed, so it equals this module's output."""
        rows = [self.embed(ids) for ids in torch.arange(self.num_embeddings).split(65536)]
        return self._dense_module(torch.cat(rows).detach())

    def table_bytes(self) -> TableBytes:
        """Bytes of the tensors held: payload (the parameters), index (the hash parameters)."""
        payload = sum(p.numel() * p.element_size() for p in self.parameters())
        return TableBytes(payload, self.hash_params.numel() * self.hash_params.element_size())

    def _sizes(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def record_args(self) -> dict[str, Any]:
        """What rebuilds this module from a layout record (``compresskit.layout``): options, sizes and seed; the
        parameters come from its state dict."""
        return {**self._options(), **self._sizes(), "seed": self.seed}

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "_HashedBase":
        """The module :meth:`record_args` describes (its state dict fills the values)."""
        replaced_table(model, name, args)
        return cls(**args)

    @classmethod
    def from_budget(cls, dense: nn.Module, budget_bytes: int, seed: int = 0) -> "_HashedBase":
        """The largest one whose payload and index fit ``budget_bytes``, replacing ``dense`` (its options; values
        drawn at ``dense``'s scale); ValueError when even the smallest does not fit."""
        bag = check_dense(dense, cls.__name__)
        options = {"num_embeddings": dense.num_embeddings, "embedding_dim": dense.embedding_dim,
                   "mode": dense.mode if bag else "sum", "include_last_offset": dense.include_last_offset if bag
                   else False, "bag": bag, "sparse": dense.sparse, "seed": seed}
        sizes = cls.sizes_for_budget(dense.num_embeddings, dense.embedding_dim, budget_bytes)
        std = float(dense.weight.detach().float().std()) if dense.weight.numel() > 1 else 1.0
        return cls(**options, **sizes, init_std=std)

    @staticmethod
    def sizes_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int) -> dict[str, int]:
        """Constructor sizes of the largest one within ``budget_bytes``; ValueError when none fits."""
        raise NotImplementedError  # pragma: no cover - overridden

    @classmethod
    def minimum_bytes(cls, num_embeddings: int, embedding_dim: int) -> int:
        """Bytes of the smallest one (what a table costs at least, however small its share of a budget)."""
        raise NotImplementedError  # pragma: no cover - overridden


def share_budget(tables: list[tuple[int, int]], budget_bytes: int, minimum: Any) -> list[int]:
    """Split ``budget_bytes`` over tables ``(rows, dim)`` as a row cap does (DLRM's ``max-ind-range``): every table
    gets ``min(its dense bytes, cap)``, but at least ``minimum(rows, dim)``, with the largest ``cap`` that fits. A
    small table is then kept whole and the big ones share the rest equally. ValueError when the minimums alone
    exceed the budget."""
    dense = [r * d * FLOAT_BYTES for r, d in tables]
    floor = [min(minimum(r, d), budget_bytes + 1) for r, d in tables]

    def shares(cap: int) -> list[int]:
        return [max(f, min(b, cap)) for f, b in zip(floor, dense)]

    if sum(floor) > budget_bytes:
        raise ValueError(f"{budget_bytes} bytes are below the {sum(floor)} bytes the smallest form of every table "
                         f"takes")
    low, high = 0, max(dense)
    while low < high:                  # the largest cap whose shares fit
        mid = (low + high + 1) // 2
        if sum(shares(mid)) <= budget_bytes:
            low = mid
        else:
            high = mid - 1
    return shares(low)


def _index_bytes(hashes: int) -> int:
    return hashes * 2 * 8


class HashedEmbeddingBag(_HashedBase):
    """The hashing trick: ``rows`` shared rows of ``embedding_dim`` values; id ``i`` reads row ``h(i) mod rows``
    (row ``i`` itself when ``rows >= num_embeddings``: no collisions)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rows: int, mode: str = "sum",
                 include_last_offset: bool = False, bag: bool = True, sparse: bool = False, seed: int = 0,
                 init_std: float = 1.0) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        # a table given all its rows is not hashed, and keeps no hash parameters
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse, seed,
                         int(rows < num_embeddings))
        self.rows = min(rows, num_embeddings)
        self.weight = nn.Parameter(torch.randn(self.rows, embedding_dim) * init_std)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows < self.num_embeddings:
            ids = _hash(ids, self.hash_params[0, 0], self.hash_params[0, 1], self.rows)
        return F.embedding(ids, self.weight, sparse=self.sparse)

    def _sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    @staticmethod
    def sizes_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int) -> dict[str, int]:
        if budget_bytes >= num_embeddings * embedding_dim * FLOAT_BYTES:
            return {"rows": num_embeddings}
        rows = (budget_bytes - _index_bytes(1)) // (embedding_dim * FLOAT_BYTES)
        if rows < 1:
            raise ValueError(f"{budget_bytes} bytes hold no row of {embedding_dim} values")
        return {"rows": int(min(rows, num_embeddings))}

    @classmethod
    def minimum_bytes(cls, num_embeddings: int, embedding_dim: int) -> int:
        # one row; hashed onto it (one hash function) unless the table has just that row
        return embedding_dim * FLOAT_BYTES + (_index_bytes(1) if num_embeddings > 1 else 0)


class QREmbeddingBag(_HashedBase):
    """The quotient-remainder trick: ``E_q[i // collisions] * E_r[i % collisions]`` (elementwise)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, collisions: int, mode: str = "sum",
                 include_last_offset: bool = False, bag: bool = True, sparse: bool = False, seed: int = 0,
                 init_std: float = 1.0) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse, seed, 0)
        if not 1 <= collisions <= num_embeddings:
            raise ValueError(f"collisions must be in [1, {num_embeddings}], got {collisions}")
        self.collisions = collisions
        # a product of two N(0, s^2) values has std s^2: each table at the square root of the wanted scale
        s = math.sqrt(init_std)
        self.quotient = nn.Parameter(torch.randn(-(-num_embeddings // collisions), embedding_dim) * s)
        self.remainder = nn.Parameter(torch.randn(collisions, embedding_dim) * s)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.collisions
        return F.embedding(ids // c, self.quotient, sparse=self.sparse) * \
            F.embedding(ids % c, self.remainder, sparse=self.sparse)

    def _sizes(self) -> dict[str, Any]:
        return {"collisions": self.collisions}

    @staticmethod
    def sizes_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int) -> dict[str, int]:
        """The fewest collisions ``c`` (the most rows) with ``ceil(n / c) + c`` rows within the budget."""
        rows = budget_bytes // (embedding_dim * FLOAT_BYTES)
        n = num_embeddings
        if rows >= n + 1:
            return {"collisions": 1}
        low = max(1, int((rows - math.sqrt(max(rows * rows - 4 * n, 0))) // 2))
        for c in range(low, max(low, math.isqrt(n) + 2) + 1):
            if -(-n // c) + c <= rows:
                return {"collisions": c}
        raise ValueError(f"{budget_bytes} bytes hold {rows} rows of {embedding_dim} values; the quotient-remainder "
                         f"trick needs at least {QREmbeddingBag._fewest_rows(n)} for {n} ids")

    @staticmethod
    def _fewest_rows(n: int) -> int:
        c = max(math.isqrt(n), 1)
        return min(-(-n // k) + k for k in (c, c + 1))

    @classmethod
    def minimum_bytes(cls, num_embeddings: int, embedding_dim: int) -> int:
        return cls._fewest_rows(num_embeddings) * embedding_dim * FLOAT_BYTES


class RobeEmbeddingBag(_HashedBase):
    """ROBE-Z: one shared array of ``size`` values; block ``j`` (``block`` values) of id ``i`` starts at
    ``h(i * blocks + j) mod size`` and wraps around the array's end."""

    def __init__(self, num_embeddings: int, embedding_dim: int, size: int, block: int = 32, mode: str = "sum",
                 include_last_offset: bool = False, bag: bool = True, sparse: bool = False, seed: int = 0,
                 init_std: float = 1.0) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse, seed, 1)
        block = min(block, embedding_dim)
        if embedding_dim % block:
            raise ValueError(f"block {block} must divide embedding_dim {embedding_dim}")
        if size < block:
            raise ValueError(f"size must be >= block ({block}), got {size}")
        self.size, self.block = size, block
        self.array = nn.Parameter(torch.randn(size) * init_std)
        self.register_buffer("_within", torch.arange(block), persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.embedding_dim // self.block
        keys = ids[:, None] * blocks + torch.arange(blocks, device=ids.device)
        start = _hash(keys, self.hash_params[0, 0], self.hash_params[0, 1], self.size)
        where = (start[:, :, None] + self._within) % self.size
        return self.array[where.reshape(-1)].view(-1, self.embedding_dim)

    def _sizes(self) -> dict[str, Any]:
        return {"size": self.size, "block": self.block}

    @staticmethod
    def sizes_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int) -> dict[str, int]:
        size = (budget_bytes - _index_bytes(1)) // FLOAT_BYTES
        block = _robe_block(embedding_dim)
        if size < block:
            raise ValueError(f"{budget_bytes} bytes hold fewer than one block of {block} values")
        return {"size": int(min(size, num_embeddings * embedding_dim)), "block": block}

    @classmethod
    def minimum_bytes(cls, num_embeddings: int, embedding_dim: int) -> int:
        block = _robe_block(embedding_dim)
        return _index_bytes(1) + block * FLOAT_BYTES


def _robe_block(embedding_dim: int) -> int:
    """ROBE's block: 32 values, or the largest power-of-two divisor of the dim below that."""
    block = min(32, embedding_dim)
    while embedding_dim % block:
        block //= 2
    return block


def _three_factors(n: int) -> tuple[int, int, int]:
    """``(a, b, c)`` with ``a * b * c == n`` as equal as the divisors allow (for the embedding dim)."""
    best = (1, 1, n)
    for a in range(1, round(n ** (1 / 3)) + 2):
        if n % a:
            continue
        for b in range(a, math.isqrt(n // a) + 1):
            if (n // a) % b == 0:
                c = n // a // b
                if max(a, b, c) < max(best):
                    best = (a, b, c)
    return best


class TTEmbeddingBag(_HashedBase):
    """TT-Rec: a three-core tensor train of rank ``rank``; row ``i = (i1 * n2 + i2) * n3 + i3`` is
    ``G1[i1] G2[i2] G3[i3]`` reshaped to ``embedding_dim``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, mode: str = "sum",
                 include_last_offset: bool = False, bag: bool = True, sparse: bool = False, seed: int = 0,
                 init_std: float = 1.0) -> None:
        super().__init__(num_embeddings, embedding_dim, mode, include_last_offset, bag, sparse, seed, 0)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.row_factors = self.factor_rows(num_embeddings)
        self.dim_factors = _three_factors(embedding_dim)
        (n1, n2, n3), (d1, d2, d3) = self.row_factors, self.dim_factors
        # each entry of the product sums rank^2 products of three core values: std s^3 * rank = init_std
        s = (init_std / rank) ** (1 / 3)
        self.core1 = nn.Parameter(torch.randn(n1, d1, rank) * s)
        self.core2 = nn.Parameter(torch.randn(n2, rank, d2 * rank) * s)
        self.core3 = nn.Parameter(torch.randn(n3, rank, d3) * s)

    @staticmethod
    def factor_rows(n: int) -> tuple[int, int, int]:
        """``(n1, n2, n3)``, each about ``n ** (1/3)``, with ``n1 n2 n3 >= n``."""
        n3 = max(1, math.ceil(n ** (1 / 3)))
        n2 = max(1, math.ceil(math.sqrt(-(-n // n3))))
        return -(-n // (n2 * n3)), n2, n3

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        (_, n2, n3), (d1, d2, d3) = self.row_factors, self.dim_factors
        r = self.rank
        i3 = ids % n3
        i2 = (ids // n3) % n2
        i1 = ids // (n3 * n2)
        a = self.core1[i1]                                              # [n, d1, r]
        ab = torch.bmm(a, self.core2[i2]).reshape(-1, d1 * d2, r)       # [n, d1 d2, r]
        return torch.bmm(ab, self.core3[i3]).reshape(-1, d1 * d2 * d3)  # [n, d1 d2 d3]

    def _sizes(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @staticmethod
    def sizes_for_budget(num_embeddings: int, embedding_dim: int, budget_bytes: int) -> dict[str, int]:
        """The largest rank whose three cores fit the budget."""
        (n1, n2, n3), (d1, d2, d3) = TTEmbeddingBag.factor_rows(num_embeddings), _three_factors(embedding_dim)

        def size(r: int) -> int:
            return FLOAT_BYTES * (n1 * d1 * r + n2 * r * d2 * r + n3 * r * d3)

        if size(1) > budget_bytes:
            raise ValueError(f"{budget_bytes} bytes do not hold rank-1 cores ({size(1)} bytes)")
        rank = 1
        while size(rank + 1) <= budget_bytes and rank < 1024:
            rank += 1
        return {"rank": rank}

    @classmethod
    def minimum_bytes(cls, num_embeddings: int, embedding_dim: int) -> int:
        (n1, n2, n3), (d1, d2, d3) = cls.factor_rows(num_embeddings), _three_factors(embedding_dim)
        return FLOAT_BYTES * (n1 * d1 + n2 * d2 + n3 * d3)


# the table class of each hashing-family ``method`` (``methods/hashing.py``)
HASHED_TABLES = {"hashing": HashedEmbeddingBag, "qr": QREmbeddingBag, "robe": RobeEmbeddingBag,
                 "tt_rec": TTEmbeddingBag}
