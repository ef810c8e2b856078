"""FIITED: fine-grained in-training embedding dimension pruning on a prefix-chunk store."""
from .embedding import FiitedEmbedding, FiitedEmbeddingBag, convert_embeddings, fiited_modules
from .plugin import FiitedConfig, FiitedPlugin
from .store import ChunkStore, StoreFullError

__all__ = ["ChunkStore", "StoreFullError", "FiitedEmbeddingBag", "FiitedEmbedding", "convert_embeddings",
           "fiited_modules", "FiitedPlugin", "FiitedConfig"]
