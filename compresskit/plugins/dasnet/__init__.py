"""DASNet: winners-take-all dropout for dynamic activation sparsity, with a sparse execution path."""
from .compact import ChannelSparse
from .convert import native_batch_sizes, prepacked_batch_sizes, to_sparse_execution, tuned_dense_batch_sizes
from .fuse import PassFolded, fold_batchnorm
from .plugin import DasnetConfig, DasnetPlugin
from .sparse_exec import SparseConv2d, SparseLinear, SparsePool
from .wta import WTADropout, compact_wta, conv_activation_names, insert_wta, wta_mask

__all__ = ["WTADropout", "insert_wta", "conv_activation_names", "wta_mask", "compact_wta", "ChannelSparse",
           "SparseConv2d", "SparseLinear", "SparsePool", "to_sparse_execution", "prepacked_batch_sizes", "native_batch_sizes",
           "tuned_dense_batch_sizes", "PassFolded", "fold_batchnorm", "DasnetPlugin", "DasnetConfig"]
