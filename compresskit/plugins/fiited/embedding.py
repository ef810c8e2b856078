"""Drop-in ``nn.EmbeddingBag`` / ``nn.Embedding`` replacements backed by a :class:`ChunkStore`.

Before any pruning the modules compute exactly what the dense modules compute. After pruning, a row reads its
missing chunks as zeros and gradients reach only the chunks that are stored. Lookup, pooling and backward run in
the store's fused kernels (``kernels.py``); with ``optimizer=`` the update is fused into the backward too, as in
FBGEMM's table-batched embeddings, and the pool never holds a gradient.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ...table_types import TableBytes
from . import kernels
from .cache import HotRowCache, flat_cache_values
from .packed import PackedEmbedding, PackedEmbeddingBag
from .quantized_training import quantized_backward
from .chunk_codec import ROUNDING
from .store import ChunkStore

UTILITY = "utility"
CANDIDATE = "candidate_utility"
FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
ACCESS = "row_access"
TRAINING_BUFFERS = ("utility_scale", "row_momentum", CANDIDATE, "seen", ACCESS)   # registered by training-time setters


def check_dense(dense: nn.Module, what: str) -> bool:
    """Refuse (ValueError naming the option) what a compressed twin cannot honour: ``max_norm``, ``padding_idx``,
    ``scale_grad_by_freq``, bag mode ``max``, a frozen weight, a dtype other than float32 and a weight on the meta
    device; return True for ``nn.EmbeddingBag``, False for ``nn.Embedding``. Every other constructor option
    (``sparse``, ``include_last_offset``, ``mode`` sum/mean, ``norm_type`` without ``max_norm``) is honoured."""
    if not isinstance(dense, (nn.EmbeddingBag, nn.Embedding)):
        raise TypeError(f"{what}.from_dense expects nn.EmbeddingBag or nn.Embedding, got {type(dense).__name__}")
    for name in ("max_norm", "padding_idx"):
        if getattr(dense, name) is not None:
            raise ValueError(f"{name}={getattr(dense, name)} is not supported by {what}")
    if dense.scale_grad_by_freq:
        raise ValueError(f"scale_grad_by_freq=True is not supported by {what}")
    bag = isinstance(dense, nn.EmbeddingBag)
    if bag and dense.mode not in ("sum", "mean"):
        raise ValueError(f"mode '{dense.mode}' is not supported by {what} (only 'sum' and 'mean')")
    weight = dense.weight
    if not weight.requires_grad:
        raise ValueError(f"a frozen weight (requires_grad=False, e.g. _freeze=True) is not supported by {what}: it "
                         f"trains its table; compress a trainable one")
    if weight.dtype != torch.float32:
        raise ValueError(f"dtype {str(weight.dtype).replace('torch.', '')} is not supported by {what} (only "
                         f"float32; for int8/int4 storage set the fiited stage's precision.storage)")
    if weight.is_meta:
        raise ValueError(f"a weight on the meta device is not supported by {what}: it copies the values, so "
                         f"materialise the table first (to_empty() and initialise it)")
    return bag


def replaced_table(model: nn.Module, name: str, args: dict[str, Any]) -> nn.Module | None:
    """The table at ``name`` of ``model`` that a layout record (``compresskit.layout``) replaces (None at the
    root); ValueError when its shape is not the record's ``num_embeddings x embedding_dim``."""
    old = model.get_submodule(name) if name else None
    shape = (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
    wanted = (args.get("num_embeddings"), args.get("embedding_dim"))
    if old is not None and shape != wanted:
        raise ValueError(f"the table is {shape[0]} x {shape[1]} in the model but {wanted[0]} x {wanted[1]} in the "
                         f"record")
    return old


class _PrefixBag(torch.autograd.Function):
    """Pooled lookup over the store; the backward is the module's (gradient out, or a fused update)."""

    @staticmethod
    def forward(ctx, anchor, weights, module, ids, offsets):
        # ``anchor`` is the pool, or a stand-in when the update is fused: either way autograd calls backward
        ctx.module = module
        ctx.save_for_backward(ids, offsets, weights)
        ctx.has_weights = weights is not None
        return module._pooled(ids, offsets, None if weights is None else weights.detach(), module.mode == "mean")

    @staticmethod
    def backward(ctx, grad_out):
        ids, offsets, weights = ctx.saved_tensors
        weights = weights if ctx.has_weights else None
        m = ctx.module
        grad_weights = None
        if weights is not None and ctx.needs_input_grad[1]:
            rows = m._pooled(ids, torch.arange(ids.numel()), None, False)
            bag_of, _ = kernels.positions(ids, offsets, None, False, rows.dtype)
            grad_weights = (rows * grad_out[bag_of]).sum(1)
        grad_pool = m._backward(grad_out, ids, offsets, weights) if ctx.needs_input_grad[0] else None
        return grad_pool, grad_weights, None, None, None


class FiitedEmbeddingBag(nn.Module):
    """``nn.EmbeddingBag`` with per-row variable dimension (a prefix of chunks) stored in a :class:`ChunkStore`.

    Args:
        num_embeddings, embedding_dim, mode, include_last_offset: as ``nn.EmbeddingBag`` (modes 'sum', 'mean').
        chunk_size: values per chunk; must divide ``embedding_dim``.
        weight: initial dense table to copy (default: N(0, ``init_std``), ``nn.EmbeddingBag``'s N(0, 1)).
        init_std: scale of fresh values (re-admitted rows, lazy admission; default: the std of ``weight``, else 1).
        lazy: start empty and give a row its chunks when training first touches it, within ``capacity`` chunk
            slots (tables too large to materialise). Rows that do not fit are retried on later touches.
        sparse: gradients for the pool as sparse tensors (torch's SGD / Adagrad), as ``nn.EmbeddingBag``.
        optimizer: ``sgd``, ``adagrad`` or ``rowwise_adagrad`` fuses that update into the backward with ``lr`` and
            ``eps`` (FBGEMM's EXACT_* semantics); ``None`` leaves the pool to a torch optimizer.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int = 4, mode: str = "sum",
                 include_last_offset: bool = False, weight: torch.Tensor | None = None, lazy: bool = False,
                 capacity: int | None = None, sparse: bool = False, optimizer: str | None = None,
                 lr: float = 0.01, eps: float = 1e-8, init_std: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got '{mode}'")
        if chunk_size < 1 or embedding_dim % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} must divide embedding_dim {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.chunk_size = num_embeddings, embedding_dim, chunk_size
        self.num_chunks = embedding_dim // chunk_size
        self.mode, self.include_last_offset, self.sparse, self.lazy = mode, include_last_offset, sparse, lazy
        if init_std is None:   # fresh rows and chunks take the table's own scale
            init_std = float(weight.detach().float().std()) if weight is not None and weight.numel() > 1 else 1.0
        self.init_std = init_std
        full = num_embeddings * self.num_chunks
        if lazy:
            self.store = ChunkStore(num_embeddings, self.num_chunks, chunk_size,
                                    capacity=capacity if capacity is not None else full, fixed_capacity=True)
            self.register_buffer("seen", torch.zeros((num_embeddings + 7) // 8, dtype=torch.uint8))  # 1 bit a row
            self._gen = torch.Generator().manual_seed(seed)
        else:
            self.store = ChunkStore(num_embeddings, self.num_chunks, chunk_size)
            if weight is None:
                weight = torch.randn(num_embeddings, embedding_dim) * init_std
            self.store.load_dense(weight)
        self.optimizer: str | None = None
        self.lr, self.eps = lr, eps
        self._anchor = torch.zeros(0, requires_grad=True)  # makes autograd call the fused backward
        if optimizer is not None:
            self.set_optimizer(optimizer, lr, eps)
        self.utility_decay: float | None = None
        self.cache: HotRowCache | None = None
        self.rounding = "nearest"
        self._rounding_gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_dense(cls, dense: nn.EmbeddingBag, chunk_size: int, **kwargs) -> "FiitedEmbeddingBag":
        """Copy an ``nn.EmbeddingBag`` (its weights and options) into a FIITED bag."""
        check_dense(dense, cls.__name__)
        kwargs.setdefault("sparse", dense.sparse)
        return cls(dense.num_embeddings, dense.embedding_dim, chunk_size, mode=dense.mode,
                   include_last_offset=dense.include_last_offset, weight=dense.weight.detach(), **kwargs)

    def record_args(self) -> dict[str, Any]:
        """What rebuilds this table's structure from a layout record (``compresskit.layout``): shape, options,
        fused optimizer, rounding; pool, codes, cache and training state come from its state dict, which the
        rebuilt table adopts."""
        args = {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "chunk_size": self.chunk_size, "lazy": self.lazy, "sparse": self.sparse, "optimizer": self.optimizer,
                "lr": self.lr, "eps": self.eps, "init_std": self.init_std, "rounding": self.rounding}
        if type(self) is FiitedEmbeddingBag:
            args.update(mode=self.mode, include_last_offset=self.include_last_offset)
        if self.lazy:
            args["capacity"] = self.store.capacity
        return args

    @classmethod
    def from_record(cls, model: nn.Module, name: str, args: dict[str, Any]) -> "FiitedEmbeddingBag":
        """The table :meth:`record_args` describes, put where ``model`` holds the one it replaced (a dense table
        of that shape lends its values until the state dict loads, so nothing is drawn at random)."""
        args = dict(args)
        rounding = args.pop("rounding", "nearest")
        old = replaced_table(model, name, args)
        if not args.get("lazy") and isinstance(old, (nn.Embedding, nn.EmbeddingBag)):
            args["weight"] = old.weight.detach()
        table = cls(**args)
        table.rounding = rounding
        return table

    def set_optimizer(self, optimizer: str, lr: float, eps: float = 1e-8) -> None:
        """Fuse ``optimizer`` (sgd, adagrad, rowwise_adagrad) into backward; the pool then takes no gradient and
        is left out of torch optimizers (``requires_grad=False``)."""
        if optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(FUSED_OPTIMIZERS)}, got '{optimizer}'")
        if self.optimizer is not None:
            raise ValueError(f"the fused optimizer is already '{self.optimizer}'")
        self.optimizer, self.lr, self.eps = optimizer, lr, eps
        if optimizer == "adagrad":
            self.store.register_slot_buffer("momentum", (self.chunk_size,))
        elif optimizer == "rowwise_adagrad":
            self.register_buffer("row_momentum", torch.zeros(self.num_embeddings))
        self.store.pool.requires_grad_(False)

    def set_precision(self, storage: str, cache_rows: float = 0.0, rounding: str = "stochastic",
                      seed: int = 0, scales: str = "chunk", cache_bytes: float = 0.0) -> None:
        """Store the chunks as ``'int8'`` / ``'int4'`` codes with an FP16 scale a chunk (``scales='row'``: an FP16
        scale and offset a row, FBGEMM's row-wise layout; ``chunk_codec.py``), and serve the rows most accessed in
        training from an FP32 cache of their stored chunks (``cache.py``, refreshed by :meth:`refresh_cache`): at
        most the ``cache_rows`` fraction of the rows and, with ``cache_bytes`` > 0, at most that fraction of the
        dense FP32 table's bytes (either alone sizes the cache; both 0: no cache). Training updates cached rows in
        FP32 and re-quantizes the others with ``rounding`` (``quantized_training.py`` says why stochastic is the
        default). Needs a fused optimizer (:meth:`set_optimizer`)."""
        if self.optimizer is None:
            raise ValueError("quantized chunks are trained by a fused optimizer only: call set_optimizer first "
                             "(a torch optimizer would need an FP32 copy of every chunk)")
        if rounding not in ROUNDING:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDING)}, got {rounding!r}")
        if not 0.0 <= cache_rows <= 1.0:
            raise ValueError(f"cache_rows must be a fraction of the rows in [0, 1], got {cache_rows}")
        if not 0.0 <= cache_bytes <= 1.0:
            raise ValueError(f"cache_bytes must be a fraction of the dense table's bytes in [0, 1], got {cache_bytes}")
        self.store.set_storage(storage, scales)
        self.rounding = rounding
        self._rounding_gen.manual_seed(seed)
        rows = int(round(cache_rows * self.num_embeddings)) if cache_rows else self.num_embeddings
        budget = int(cache_bytes * self.num_embeddings * self.embedding_dim * 4)
        self.cache = HotRowCache(self.num_embeddings, self.embedding_dim, rows, self.chunk_size, budget) \
            if (cache_rows and rows) or budget else None

    def refresh_cache(self) -> dict[str, int]:
        """Re-rank the cache by recent accesses (evicted rows written back quantized, see :class:`HotRowCache`)."""
        if self.cache is None:
            return {"evicted": 0, "admitted": 0}
        return self.cache.refresh(self.store)

    def _pooled(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool
                ) -> torch.Tensor:
        """Pooled bags over the store (FP32 chunks, or quantized ones and the FP32 cache)."""
        store = self.store
        if not store.quantized:
            return kernels.bag_forward(store.pool.detach(), store.counts, store.base, ids, offsets, weights, mean,
                                       self.embedding_dim, self.num_embeddings)
        return kernels.qbag_forward(store.codes, store.scales, store.bits, self.chunk_size, store.counts, store.base,
                                    ids, offsets, weights, mean, self.embedding_dim, self.num_embeddings, self.cache)

    def _generators(self) -> dict[str, torch.Generator]:
        """The random streams training draws from, saved with the state so that a resumed run continues them:
        stochastic rounding's, and a lazy table's initialisation of admitted rows."""
        gens = {"rounding_generator": self._rounding_gen}
        if self.lazy:
            gens["init_generator"] = self._gen
        return gens

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, gen in self._generators().items():
            destination[prefix + name] = gen.get_state()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        older = state_dict.get(prefix + "cache.values")
        if torch.is_tensor(older) and older.dim() == 2:   # a cache saved with full-dimension rows: its stored chunks
            # (in place: the cache's own load reads this dict)
            if prefix + "store.counts" not in state_dict or prefix + "cache.ids" not in state_dict:
                raise ValueError(f"{prefix}cache.values holds full-dimension rows (a compresskit before caches held "
                                 f"stored chunks only), which convert only with the store's counts and the cache's "
                                 f"ids in the same state dict: load the whole model.pt")
            state_dict[prefix + "cache.values"], state_dict[prefix + "cache.starts"] = flat_cache_values(
                state_dict[prefix + "cache.ids"], older, state_dict[prefix + "store.counts"], self.chunk_size)
        starts, counts, ids = (state_dict.get(prefix + k) for k in ("cache.starts", "store.counts", "cache.ids"))
        if all(torch.is_tensor(t) for t in (starts, counts, ids)) and starts.numel() == ids.numel() + 1 and \
                ids.numel() and 0 <= int(ids.min()) and int(ids.max()) < counts.numel() and \
                bool((starts[1:] >= starts[:-1]).all()) and \
                not torch.equal(starts[1:] - starts[:-1], counts[ids].long()):   # (a broken layout: the cache says)
            raise ValueError(f"{prefix}cache.starts disagree with {prefix}store.counts on the cached rows' chunks: "
                             f"the state mixes a cache and a store of different trainings")
        saved = {name: state_dict[prefix + name] for name in ("rounding_generator", "init_generator")
                 if torch.is_tensor(state_dict.get(prefix + name))}
        if saved:   # restored here, not a buffer (and absent from states saved before they were kept)
            state_dict = {k: v for k, v in state_dict.items() if k[len(prefix):] not in saved or not k.startswith(prefix)}
            for name, gen in self._generators().items():
                if name in saved:
                    gen.set_state(saved[name].to(torch.uint8))
        limit = state_dict.get(prefix + "cache.limit")
        if limit is not None and self.cache is None:   # a quantized table's state with its cache: build one
            self.cache = HotRowCache(self.num_embeddings, self.embedding_dim, int(limit), self.chunk_size)
        # state that training adds (utility scale, row-wise Adagrad state, candidate utilities, the lazy 'seen'
        # bitmap): a trained table's state dict loads into a freshly converted twin, which adopts it
        for name in TRAINING_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if torch.is_tensor(incoming) and name not in self._buffers:
                self.register_buffer(name, torch.empty(incoming.shape, dtype=incoming.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ----------------------------------------------------------------------------------------------- utilities
    def track_utility(self, decay: float) -> None:
        """Keep a decayed per-chunk utility ``u <- decay * u + ||g||`` (FIITED's importance), updated in backward.

        Stored scaled by ``decay ** -t`` so that a step decays every chunk for free; :meth:`utilities` unscales.
        """
        if UTILITY not in self.store._slot_buffers:
            self.store.register_slot_buffer(UTILITY)
            self.register_buffer("utility_scale", torch.ones((), dtype=torch.float64))
        self.utility_decay = decay

    def track_candidates(self, span: str) -> None:
        """Also keep a decayed utility per row for what the row does not store, so pruned chunks can come back:
        ``span='chunk'``: the row's first missing chunk (FIITED's regrowth); ``span='row'``: the whole row, for
        every row, stored or not (AdaEmbed's importance, access frequency x gradient norm). Needs
        :meth:`track_utility` first (the two decay together); updated in backward."""
        if span not in ("chunk", "row"):
            raise ValueError(f"span must be 'chunk' or 'row', got {span!r}")
        if self.utility_decay is None:
            raise ValueError("track_candidates needs track_utility first")
        if not hasattr(self, CANDIDATE):
            self.register_buffer(CANDIDATE, torch.zeros(self.num_embeddings))
        self.candidate_span = span

    def track_access(self) -> None:
        """Also keep a decayed access count per row (decayed with the utilities, updated in backward), so that
        :meth:`utilities` can be read per access (:func:`~.importance.chunk_utilities` with ``per_access``).
        Needs :meth:`track_utility` first."""
        if self.utility_decay is None:
            raise ValueError("track_access needs track_utility first")
        if not hasattr(self, ACCESS):
            self.register_buffer(ACCESS, torch.zeros(self.num_embeddings))

    def row_accesses(self, rows: torch.Tensor) -> torch.Tensor:
        """Current decayed access counts of ``rows`` (see :meth:`track_access`)."""
        return getattr(self, ACCESS)[rows] * float(self.utility_scale)

    def candidate_utilities(self, rows: torch.Tensor) -> torch.Tensor:
        """Current candidate utilities of ``rows`` (see :meth:`track_candidates`)."""
        return getattr(self, CANDIDATE)[rows] * float(self.utility_scale)

    def utilities(self, slots: torch.Tensor) -> torch.Tensor:
        """Current utilities of the chunks in ``slots``."""
        return getattr(self.store, UTILITY)[slots] * float(self.utility_scale)

    def _utility_gain(self) -> float:
        scale = float(self.utility_scale) * self.utility_decay
        if scale < 1e-30:  # fold the scale into the stored values before it underflows
            getattr(self.store, UTILITY).mul_(scale)
            for name in (CANDIDATE, ACCESS):
                if hasattr(self, name):
                    getattr(self, name).mul_(scale)
            scale = 1.0
        self.utility_scale.fill_(scale)
        return 1.0 / scale

    # ----------------------------------------------------------------------------------------------- training
    def _backward(self, grad_out: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                  weights: torch.Tensor | None):
        store = self.store
        tracking = self.utility_decay is not None
        state = None
        if self.optimizer == "adagrad":
            state = store.momentum
        elif self.optimizer == "rowwise_adagrad":
            state = self.row_momentum
        gain = self._utility_gain() if tracking else 1.0
        if tracking and hasattr(self, ACCESS):
            getattr(self, ACCESS).index_add_(0, ids, torch.full((ids.numel(),), gain, dtype=torch.float32))
        if tracking and getattr(self, "candidate_span", None):
            self._track_candidates(grad_out, ids, offsets, weights, gain)   # before a fused update moves rows
        if store.quantized:
            quantized_backward(self, grad_out, ids, offsets, weights, state,
                               getattr(store, UTILITY) if tracking else None, gain)
            return None
        result = kernels.bag_backward(
            grad_out, store.pool.detach(), store.counts, store.base, ids, offsets, weights, self.mode == "mean",
            self.num_embeddings, self.optimizer or "none", self.lr, self.eps, state,
            getattr(store, UTILITY) if tracking else None, gain, sparse=self.sparse)
        if self.optimizer is not None:
            return None
        if self.sparse:
            slots, values = result
            return torch.sparse_coo_tensor(slots[None], values, store.pool.shape, check_invariants=False)
        return result

    def _track_candidates(self, grad_out: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                          weights: torch.Tensor | None, gain: float) -> None:
        """Add ``gain * ||g||`` per row, ``g`` being the gradient summed over the batch of the row's first missing
        chunk (span 'chunk', rows not full) or of the whole row (span 'row'), as the stored chunks gain theirs."""
        counts = self.store.counts[ids].long()
        whole = self.candidate_span == "row"
        open_rows = torch.ones_like(counts, dtype=torch.bool) if whole else counts < self.num_chunks
        if not bool(open_rows.any()):
            return
        at = torch.nonzero(open_rows).flatten()
        bag_of, w = kernels.positions(ids, offsets, weights, self.mode == "mean", torch.float32)
        rows, inverse = torch.unique(ids[at], return_inverse=True)
        g = grad_out.float()[bag_of[at]] * w[at, None]
        if not whole:
            cs = self.chunk_size
            cols = (self.store.counts[rows].long() * cs)[:, None] + torch.arange(cs)
            g = g.gather(1, cols[inverse])
        summed = g.new_zeros(rows.numel(), g.shape[1]).index_add_(0, inverse, g)
        getattr(self, CANDIDATE).index_add_(0, rows, gain * summed.norm(dim=1))

    def _admit(self, rows: torch.Tensor) -> None:
        """Lazy mode: give never-seen ``rows`` all their chunks while the pool has room."""
        seen = (self.seen[rows >> 3] >> (rows & 7).to(torch.uint8)) & 1
        rows = rows[seen == 0]
        if rows.numel() == 0:
            return
        std, gen = self.init_std, self._gen
        grown = self.store.grow_rows(rows, self.num_chunks,
                                     lambda n, cs: torch.randn(n, cs, generator=gen) * std)
        if grown.numel():
            blocks, inverse = torch.unique(grown >> 3, return_inverse=True)
            bits = torch.zeros(blocks.numel(), dtype=torch.int64).index_add_(0, inverse, 1 << (grown & 7))
            self.seen[blocks] |= bits.to(torch.uint8)
            if self.optimizer == "rowwise_adagrad":
                self.row_momentum[grown] = 0

    def resize_rows(self, new_counts: torch.Tensor, init: str = "zeros",
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Set every row's number of chunks in one pass (pruning and regrowth together); returns the rows that
        gained chunks.

        Fresh chunks start at zero (``init='zeros'``: the values the row already reads there, so the model's output
        does not jump) or at N(0, ``init_std``) (``'random'``), with zeroed optimizer state. With candidate
        tracking by chunk, a regrown chunk starts with the utility its row earned for it while it was missing, and
        the first chunk a row loses becomes its candidate, with the utility it had earned."""
        new_counts = new_counts.reshape(-1).long()
        old = self.store.row_counts()
        by_chunk = getattr(self, "candidate_span", None) == "chunk"
        if by_chunk:
            shrunk = torch.nonzero(new_counts < old).flatten()
            first, _ = self.store.row_slots(shrunk)
            lost = getattr(self.store, UTILITY)[first + new_counts[shrunk]].clone()
        fill = None
        if init == "random":
            std = self.init_std
            fill = (lambda n, cs: torch.randn(n, cs, generator=generator) * std)
        elif init != "zeros":
            raise ValueError(f"init must be 'zeros' or 'random', got {init!r}")
        rows, slots = self.store.resize_rows(new_counts, fill)
        if self.cache is not None:
            self.cache.resized(self.store, old, fresh_zeros=fill is None)
        grown = torch.unique(rows)
        if by_chunk:
            candidate = getattr(self, CANDIDATE)
            getattr(self.store, UTILITY)[slots] = candidate[rows]
            candidate[grown] = 0
            candidate[shrunk] = lost
        if self.optimizer == "rowwise_adagrad" and grown.numel():
            self.row_momentum[grown] = 0
        return grown

    def shrink_rows(self, new_counts: torch.Tensor) -> None:
        """Keep only the first ``new_counts[r]`` chunks of every row (pruning; see :meth:`ChunkStore.shrink_rows`)."""
        old = self.store.row_counts()
        self.store.shrink_rows(new_counts)
        if self.cache is not None:
            self.cache.resized(self.store, old)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``nn.EmbeddingBag.forward``; ``IndexError`` for an id outside ``[0, num_embeddings)``."""
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D")
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, length, device=input.device)
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("offsets are required when input is 1-D")
            if self.include_last_offset:
                offsets = offsets[:-1]
        else:
            raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        ids = input.long().contiguous()
        offsets = offsets.long().contiguous()
        kernels.check_ids(ids, self.num_embeddings)  # IndexError as nn.Embedding, before lazy admission touches rows
        if self.lazy and self.training:
            self._admit(torch.unique(ids))
        if self.cache is not None and self.training:
            self.cache.record(ids)
        anchor = self._anchor if self.optimizer is not None and self.training else self.store.pool
        return _PrefixBag.apply(anchor, per_sample_weights, self, ids, offsets)

    # ----------------------------------------------------------------------------------------------- helpers
    def row_chunk_counts(self) -> torch.Tensor:
        """Number of stored chunks of every row (int64 [num_embeddings])."""
        return self.store.row_counts()

    def table_bytes(self) -> TableBytes:
        """Bytes held: ``payload`` and ``index`` (all inference needs; a quantized table's payload is its codes,
        scales and FP32 cache, the cache also shown as ``cache``) and ``training`` (utilities, fused optimizer state,
        the lazy 'seen' bitmap, cache access counts: state only training needs)."""
        held = self.store.table_bytes()
        extra = sum(getattr(self, n).numel() * getattr(self, n).element_size()
                    for n in ("row_momentum", "seen", CANDIDATE, ACCESS) if hasattr(self, n))
        held = held + TableBytes(0, training=extra)
        return held + self.cache.table_bytes() if self.cache is not None else held

    # ----------------------------------------------------------------------------------------------- export
    def to_dense(self) -> nn.EmbeddingBag:
        """The equivalent ``nn.EmbeddingBag`` (same mode, ``include_last_offset``, ``sparse``), pruned dims as
        zeros: it loads into the model this table replaced and computes the same outputs."""
        return nn.EmbeddingBag(self.num_embeddings, self.embedding_dim, mode=self.mode,
                               include_last_offset=self.include_last_offset, sparse=self.sparse,
                               _weight=self.dense_weight())

    def dense_weight(self) -> torch.Tensor:
        """The table as ``[num_embeddings, embedding_dim]`` FP32 values (dequantized, cached rows from the cache),
        pruned dims as zeros."""
        weight = self.store.dense().float()
        if self.cache is not None and self.cache.ids.numel():
            weight[self.cache.ids] = self.cache.dense_rows(torch.arange(self.cache.ids.numel()))
        return weight

    def to_packed(self) -> PackedEmbeddingBag:
        """The inference-only twin (:class:`~compresskit.plugins.fiited.packed.PackedEmbeddingBag`): the stored
        chunks, packed, in the precision training stored them (FP32, or INT8 / INT4 codes with their scales and the
        FP32 hot-row cache), and the 1.125-byte-a-row index; no utilities, optimizer state or autograd."""
        return PackedEmbeddingBag.from_store(self.store, self.mode, self.include_last_offset, self.cache)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}, mode={self.mode!r}, "
                f"stored_chunks={self.store.live}/{self.num_embeddings * self.num_chunks}")


class FiitedEmbedding(FiitedEmbeddingBag):
    """``nn.Embedding`` drop-in: ``forward(ids of any shape) -> ids.shape + (embedding_dim,)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, chunk_size: int = 4, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, chunk_size, mode="sum", **kwargs)

    @classmethod
    def from_dense(cls, dense: nn.Embedding, chunk_size: int, **kwargs) -> "FiitedEmbedding":
        """Copy an ``nn.Embedding`` into a FIITED embedding."""
        check_dense(dense, cls.__name__)
        kwargs.setdefault("sparse", dense.sparse)
        return cls(dense.num_embeddings, dense.embedding_dim, chunk_size, weight=dense.weight.detach(), **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``nn.Embedding.forward``; ``IndexError`` for an id outside ``[0, num_embeddings)``."""
        flat = input.reshape(-1)
        out = super().forward(flat, torch.arange(flat.numel(), device=input.device))
        return out.view(*input.shape, self.embedding_dim)

    def to_dense(self) -> nn.Embedding:  # type: ignore[override]
        """The equivalent ``nn.Embedding`` (same ``sparse``), pruned dims as zeros."""
        return nn.Embedding(self.num_embeddings, self.embedding_dim, sparse=self.sparse, _weight=self.dense_weight())

    def to_packed(self) -> PackedEmbedding:  # type: ignore[override]
        """The inference-only twin as an ``nn.Embedding`` (:class:`PackedEmbedding`)."""
        return PackedEmbedding.from_store(self.store, cache=self.cache)


def fiited_modules(model: nn.Module) -> Iterator[tuple[str, FiitedEmbeddingBag]]:
    """(name, module) for every FIITED embedding in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FiitedEmbeddingBag):
            yield name, module


def embedding_modules(model: nn.Module, include: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the ``nn.Embedding`` / ``nn.EmbeddingBag`` modules of ``model`` whose name matches a
    pattern in ``include`` (all of them without patterns)."""
    import fnmatch

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            and (not include or any(fnmatch.fnmatchcase(name, pat) for pat in include))]


def convert_embeddings(model: nn.Module, chunk_size: int = 4, include: list[str] | None = None,
                       **kwargs) -> list[str]:
    """Swap every ``nn.EmbeddingBag`` / ``nn.Embedding`` (whose name matches a pattern in ``include``, if given)
    for its FIITED twin, copying weights; ``kwargs`` go to the twins (e.g. ``optimizer``, ``lr``). Returns the
    converted module names."""
    converted = []
    for name in [name for name, _ in embedding_modules(model, include)]:
        module = model.get_submodule(name)    # one dense table alive at a time beside its twin: it goes when replaced
        if module.embedding_dim % chunk_size:
            raise ValueError(f"{name}: embedding_dim {module.embedding_dim} is not a multiple of chunk_size "
                             f"{chunk_size}")
        twin_cls = FiitedEmbeddingBag if isinstance(module, nn.EmbeddingBag) else FiitedEmbedding
        model.set_submodule(name, twin_cls.from_dense(module, chunk_size, **kwargs))
        del module
        converted.append(name)
    return converted
