"""DASNet: winners-take-all dropout for dynamic activation sparsity, with a sparse execution path."""
from .plugin import DasnetConfig, DasnetPlugin
from .sparse_exec import SparseConv2d, SparseLinear, to_sparse_execution
from .wta import WTADropout, insert_wta, wta_mask

__all__ = ["WTADropout", "insert_wta", "wta_mask", "SparseConv2d", "SparseLinear", "to_sparse_execution",
           "DasnetPlugin", "DasnetConfig"]
