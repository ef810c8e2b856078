"""TorchRec's DLRM (``torchrec.models.dlrm.DLRM``) on an ``EmbeddingBagCollection`` sized from the dataset.

``forward(dense [B, num_dense], sparse: KeyedJaggedTensor) -> logits [B, 1]``: pair it with ``data.collate:
torchrec``, which turns a dataset's (dense, categorical) batches into that. TorchRec is imported only when the model
is built; without it the build stops with one line saying how to install it.
"""
from __future__ import annotations

import os
from typing import Annotated

from torch import nn

from ..data.collate import feature_names, require_torchrec
from ..errors import ConfigError
from ..schema import Range
from . import register_model


@register_model("torchrec_dlrm")
def torchrec_dlrm(num_dense: Annotated[int, Range(1, 1_000_000)],
                  cardinalities: Annotated[list[int], Range(1, 2**31 - 1)],
                  embedding_dim: Annotated[int, Range(1, 4096)] = 16,
                  dense_arch_layer_sizes: Annotated[list[int] | None, Range(1, 65536)] = None,
                  over_arch_layer_sizes: Annotated[list[int] | None, Range(1, 65536)] = None,
                  sparse_names: list[str] | None = None, weighted: bool = False) -> nn.Module:
    """``torchrec.models.dlrm.DLRM`` with one ``EmbeddingBagConfig`` (sum pooling) per sparse feature.

    ``num_dense``, ``cardinalities`` and ``sparse_names`` (the KJT keys; ``f0..`` when the dataset has none) are
    filled from the dataset when omitted, as for ``dlrm``; so is ``weighted`` (the KJT carries per-id weights, as
    the ``csv`` and ``libfm`` loaders give for weighted values: the collection is built ``is_weighted``).
    ``dense_arch_layer_sizes`` (default ``[64, embedding_dim]``) ends at ``embedding_dim``;
    ``over_arch_layer_sizes`` (default ``[64, 1]``) ends at the one logit, as TorchRec's DenseArch and OverArch
    take them."""
    dense_sizes = list(dense_arch_layer_sizes or [64, embedding_dim])
    over_sizes = list(over_arch_layer_sizes or [64, 1])
    if dense_sizes[-1] != embedding_dim:
        raise ConfigError("model.args.dense_arch_layer_sizes", f"got {dense_sizes}, expected a list ending at "
                                                                f"embedding_dim ({embedding_dim}): TorchRec's "
                                                                f"DenseArch outputs one embedding-sized vector")
    if over_sizes[-1] != 1:
        raise ConfigError("model.args.over_arch_layer_sizes", f"got {over_sizes}, expected a list ending at 1 "
                                                               f"(the logit)")
    names = feature_names(len(cardinalities), {"sparse_names": sparse_names})
    if sparse_names is not None and names != list(sparse_names):
        raise ConfigError("model.args.sparse_names", f"got {len(sparse_names)} names for {len(cardinalities)} "
                                                     f"cardinalities; expected one distinct name per feature")
    if len(set(names)) != len(names):
        raise ConfigError("model.args.sparse_names", f"got {names}, expected distinct names")
    need = sum(cardinalities) * embedding_dim * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory // 2:
        raise ValueError(f"the embedding tables need {need / 2**30:,.1f} GiB (sum(cardinalities) x embedding_dim x "
                         f"4 bytes), more than half of this machine's {memory / 2**30:,.1f} GiB")
    torchrec = require_torchrec("model.name")
    from torchrec.models.dlrm import DLRM

    tables = [torchrec.EmbeddingBagConfig(name=f"t_{name}", embedding_dim=embedding_dim, num_embeddings=rows,
                                          feature_names=[name])
              for name, rows in zip(names, cardinalities)]
    return DLRM(embedding_bag_collection=torchrec.EmbeddingBagCollection(tables=tables, is_weighted=weighted),
                dense_in_features=num_dense, dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes)
