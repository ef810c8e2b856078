"""Shared fixtures: paths to the real datasets (tests needing them skip with a reason when absent), and FIITED's
kernels run native and in pure torch (``native``)."""
from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("COMPRESSKIT_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def movielens_path() -> str:
    path = os.path.join(SHARED_DATA, "ml-100k")
    if not os.path.isfile(os.path.join(path, "u.data")):
        pytest.skip(f"MovieLens-100K not found at {path} (set COMPRESSKIT_DATA)")
    return path


@pytest.fixture
def adult_path() -> str:
    path = os.path.join(SHARED_DATA, "adult", "adult.csv")
    if not os.path.isfile(path):
        pytest.skip(f"UCI Adult not found at {path} (set COMPRESSKIT_DATA)")
    return path


def _fiited_backends() -> list[bool]:
    from compresskit.plugins.fiited import kernels

    return [True, False] if kernels.native.kernels() is not None else [False]


@pytest.fixture(params=_fiited_backends(), ids=lambda n: "native" if n else "torch")
def native(request):
    """FIITED's kernels native (where built) and in pure torch: a test using it runs once each."""
    from compresskit.plugins.fiited import kernels

    kernels.use_native(request.param)
    yield request.param
    kernels.use_native(True)
