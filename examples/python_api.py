"""Compress an existing model from Python: a DLRM you built yourself, FIITED at 10% of the embedding bytes.

    python examples/python_api.py [path/to/ml-100k]      (synthetic Criteo-shaped data without a path)
"""
from __future__ import annotations

import sys

import compresskit
from compresskit.data.movielens import load_movielens
from compresskit.data.synthetic_ctr import load_synthetic_ctr
from compresskit.models.dlrm import DLRM
from compresskit.plugins.fiited import fiited_modules

data = load_movielens(sys.argv[1]) if len(sys.argv) > 1 else load_synthetic_ctr(num_samples=50_000)
model = DLRM(data.info["num_dense"], data.info["cardinalities"], embedding_dim=32)

result = compresskit.apply(model, {
    "train": {"epochs": 2, "batch_size": 256, "optimizer": {"name": "adagrad", "lr": 0.02}},
    "stages": [{"plugin": "fiited", "target_memory_ratio": 0.1, "chunk_size": 4}],
}, data=data)

stage = result.report["stages"][0]
print(f"test {result.report['training']['test']}")
print(f"embeddings: payload {stage['payload_bytes']:,} + index {stage['index_bytes']:,} bytes of "
      f"{stage['dense_bytes']:,} dense ({stage['memory_ratio']:.1%}); training-only state "
      f"{stage['training_state_bytes']:,} bytes")
for name, module in fiited_modules(result.model):
    counts = module.row_chunk_counts()
    print(f"{name}: {module.num_embeddings} rows, mean kept dim {counts.float().mean() * module.chunk_size:.1f}")
