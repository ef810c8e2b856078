"""One typed table interface (compresskit.table_types): every table type a plugin puts in a model satisfies it, and
its bytes are the bytes of the tensors it holds, split by purpose."""
from __future__ import annotations

import torch
from torch import nn

from compresskit.plugins.fiited import FiitedEmbedding, FiitedEmbeddingBag
from compresskit.plugins.fiited.mixed_dim import MixedDimEmbeddingBag
from compresskit.plugins.fiited.natural import NarrowEmbeddingBag
from compresskit.plugins.fiited.hashing import HASHED_TABLES
from compresskit.table_types import CompressedTable, TableBytes, bytes_of, dense_bytes


def test_every_table_type_satisfies_the_protocol_and_counts_what_it_holds():
    dense = nn.EmbeddingBag(300, 16)
    fiited = FiitedEmbeddingBag.from_dense(dense, 4, optimizer="adagrad", lr=0.1)
    fiited.store.shrink_rows(torch.randint(0, 5, (300,)))
    quantized = FiitedEmbeddingBag.from_dense(dense, 4, optimizer="sgd", lr=0.1)
    quantized.set_precision("int8", cache_rows=0.1)
    tables = [fiited, quantized, FiitedEmbedding.from_dense(nn.Embedding(300, 16), 4), fiited.to_packed(),
              quantized.to_packed(), NarrowEmbeddingBag.from_dense(dense, 5),
              MixedDimEmbeddingBag.from_dense(dense, torch.randint(0, 50, (300,)), 6000),
              *[cls.from_budget(dense, 4000) for cls in HASHED_TABLES.values()]]
    for table in tables:
        assert isinstance(table, CompressedTable), type(table).__name__
        held = table.table_bytes()
        assert isinstance(held, TableBytes) and held.serving == held.payload + held.index
        assert held.total == held.serving + held.training
        assert 0 <= held.cache <= held.payload
        assert dense_bytes(table) == 300 * 16 * 4
        tensors = {id(t): t for t in [*table.parameters(), *table.buffers()]}
        assert held.total <= sum(t.numel() * t.element_size() for t in tensors.values())
    assert fiited.table_bytes().training > 0                         # Adagrad state is training-only
    assert quantized.table_bytes().cache > 0 and quantized.to_packed().table_bytes().training == 0
    packed = fiited.to_packed()
    assert packed.table_bytes().serving == fiited.table_bytes().serving   # what serving holds is what was charged
    assert not isinstance(dense, CompressedTable)
    assert bytes_of(dense) == TableBytes(300 * 16 * 4)
    assert TableBytes(1, 2, 3, 1) + TableBytes(10, 20, 30) == TableBytes(11, 22, 33, 1)
    assert TableBytes(5, 2, 3).as_dict() == {"payload": 5, "index": 2, "training": 3, "cache": 0, "serving": 7,
                                             "total": 10}
