"""FIITED: fine-grained in-training embedding dimension pruning on a VHPI chunk store."""
from .embedding import FiitedEmbedding, FiitedEmbeddingBag, convert_embeddings, fiited_modules
from .plugin import FiitedConfig, FiitedPlugin
from .store import StoreFullError, VHPIStore

__all__ = ["VHPIStore", "StoreFullError", "FiitedEmbeddingBag", "FiitedEmbedding", "convert_embeddings",
           "fiited_modules", "FiitedPlugin", "FiitedConfig"]
