"""Add winners-take-all sparsity to an existing CNN and run it through the sparse execution path.

    python examples/dasnet_existing_model.py
"""
from __future__ import annotations

import copy
import time

import torch

from compresskit.models.vgg import vgg
from compresskit.plugins.dasnet import insert_wta, to_sparse_execution

model = vgg("vgg11").eval()
placed = insert_wta(model, sparsity=0.5, blocks=2)          # after every ReLU; no new parameters
sparse = copy.deepcopy(model)
decisions = to_sparse_execution(sparse, (torch.randn(8, 3, 32, 32),), batch_sizes=(1,))
used = sorted({b for batches in decisions.values() for b in batches})
print(f"WTA after {len(placed)} activations; {len(decisions)} layers wrapped; compact path for batch sizes {used}")

x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    assert torch.allclose(model(x), sparse(x), atol=1e-5)
    for name, m in (("masked dense", model), ("sparse path", sparse)):
        for _ in range(5):
            m(x)
        start = time.perf_counter()
        for _ in range(50):
            m(x)
        print(f"{name}: {(time.perf_counter() - start) / 50 * 1000:.2f} ms per image")
