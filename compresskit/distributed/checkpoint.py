"""Sharded checkpoints of distributed runs through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shard (its tables, and the dense part once: DCP keeps one copy of a key saved by several
ranks) into ``checkpoint.tmp/``; rank 0 then swaps that folder in for ``checkpoint/`` by renames, so a reader only
ever sees a complete set (a crash between the two renames leaves ``checkpoint.old/``, which loading falls back to).

Keys are the unsharded model's (``model.embeddings.3.store.pool``) and the optimizer state is keyed by parameter
name, so a checkpoint loads on any number of ranks: resharding works. FIITED pools change size as they are pruned;
loading first resizes them to the saved sizes (DCP loads in place), then reads the values.

Before the swap rank 0 writes ``checksums.sha256`` (``sha256sum`` format) over every file of the folder; loading
verifies it on every rank, so a damaged or tampered shard is refused with one line, never resumed from.
"""
from __future__ import annotations

import io
import os
import shutil
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..atomic import write_text
from ..errors import CheckpointError, ConfigError
from ..integrity import sha256_file
from ..plugins.fiited.row_index import older_layout
from ..state_loading import adopting_shapes
from .collective import Collective

DIR_NAME = "checkpoint"
MANIFEST = "checksums.sha256"


def checkpoint_dir(out_dir: str) -> str:
    """Where a distributed run's checkpoint lives in ``out_dir``."""
    return os.path.join(out_dir, DIR_NAME)


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: Any) -> Any:
    if isinstance(data, (bytes, bytearray)):
        return torch.load(io.BytesIO(data), weights_only=True)
    if isinstance(data, io.BytesIO):
        data.seek(0)
        return torch.load(data, weights_only=True)
    return data


def save(out_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
         coll: Collective) -> str:
    """Write this rank's shard of model, optimizer and ``meta`` (step, fingerprint, history, plugin state: the
    same on every rank) and publish the checkpoint atomically; returns its folder."""
    final = checkpoint_dir(out_dir)
    tmp, old = final + ".tmp", final + ".old"
    if coll.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    coll.barrier()
    state = {"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer),
             "meta": _pack(meta), f"rng.{coll.rank}": torch.get_rng_state()}
    dcp.save(state, checkpoint_id=tmp, process_group=coll.group)
    coll.barrier()
    if coll.is_main:
        write_manifest(tmp)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    coll.barrier()
    return final


def write_manifest(folder: str) -> None:
    """Write the SHA-256 of every file in ``folder`` to its manifest."""
    names = sorted(n for n in os.listdir(folder) if n != MANIFEST)
    write_text(os.path.join(folder, MANIFEST),
               "".join(f"{sha256_file(os.path.join(folder, n))}  {n}\n" for n in names))


def verify(folder: str) -> None:
    """Check every file of a checkpoint folder against its manifest (CheckpointError on any difference)."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        raise CheckpointError(folder, f"no '{MANIFEST}' in it: compresskit writes one with every checkpoint, so "
                                      f"this folder is incomplete or not one of its checkpoints; refusing to resume")
    expected = {}
    with open(manifest, encoding="utf-8", errors="replace") as f:
        for line in f:
            digest, _, name = line.rstrip("\n").partition("  ")
            expected[name] = digest
    present = sorted(n for n in os.listdir(folder) if n != MANIFEST)
    if sorted(expected) != present:
        extra, lost = sorted(set(present) - set(expected)), sorted(set(expected) - set(present))
        raise CheckpointError(folder, f"its files differ from its manifest (missing: {', '.join(lost) or 'none'}; "
                                      f"not listed: {', '.join(extra) or 'none'}); refusing to resume")
    for name in present:
        if sha256_file(os.path.join(folder, name)) != expected[name]:
            raise CheckpointError(folder, f"checksum mismatch in '{name}': the file was damaged or changed after "
                                          f"it was written; refusing to resume")


def find(out_dir: str) -> str | None:
    """The complete checkpoint folder in ``out_dir`` (falling back to the one a crash left mid-swap), or None."""
    for path in (checkpoint_dir(out_dir), checkpoint_dir(out_dir) + ".old"):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return path
    return None


def read_meta(path: str, coll: Collective) -> dict[str, Any]:
    """The ``meta`` dict saved with a checkpoint."""
    state: dict[str, Any] = {"meta": b""}
    dcp.load(state, checkpoint_id=path, process_group=coll.group)
    return _unpack(state["meta"])


def _saved_name(key: str, suffix: str) -> str:
    """The model's name of the module whose tensor ``<name><suffix>`` a checkpoint saved under ``key``."""
    key = key[:-len(suffix)]
    return key[len("model."):] if key.startswith("model.") else key


def older_index_store(saved: dict[str, Any]) -> str | None:
    """The first FIITED store that the checkpoint metadata ``saved`` holds in the index of compresskit before 64-row
    blocks (a base every 8 rows), or None. Decided from the metadata alone, so every rank decides alike: today's
    counts are eight times the bases only for tables of up to 8 rows (one base), where both layouts agree. DCP loads
    in place into today's shapes, so such a store cannot be converted on a sharded resume (a ``model.pt`` can)."""
    for key, base in saved.items():
        if not key.endswith(".store.base"):
            continue
        counts = saved.get(key[:-len("base")] + "counts")
        if counts is not None and len(base.size) == 1 and len(counts.size) == 1 and \
                older_layout(counts.size[0], base.size[0]):
            return _saved_name(key, ".base")
    return None


def older_cache(saved: dict[str, Any]) -> str | None:
    """The first FIITED hot-row cache that the checkpoint metadata ``saved`` holds as full-dimension rows (a
    compresskit before caches held their rows' stored chunks only), or None; decided from the metadata alone."""
    for key, values in saved.items():
        if key.endswith(".cache.values") and len(getattr(values, "size", ())) == 2:
            return _saved_name(key, ".values")
    return None


def load(path: str, model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], coll: Collective
         ) -> torch.optim.Optimizer:
    """Load this rank's part of the checkpoint at ``path`` into ``model`` (resizing what was pruned) and into a
    fresh optimizer from ``make_optimizer()``, which it returns. Restores this rank's RNG state when saved."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    current = model.state_dict()
    older = older_index_store(saved)
    if older is not None:
        raise ConfigError("--resume", f"the checkpoint in '{path}' holds '{older}' in the 8-row index of an older "
                                      f"compresskit, which a sharded resume cannot convert: resume it with the "
                                      f"compresskit that wrote it, or start a new output.dir")
    cache = older_cache(saved)
    if cache is not None:
        raise ConfigError("--resume", f"the checkpoint in '{path}' holds '{cache}' as full-dimension rows (a cache of "
                                      f"an older compresskit), which a sharded resume cannot convert: resume it "
                                      f"with the compresskit that wrote it, or start a new output.dir")
    resized = {}
    for key, tensor in current.items():
        meta = saved.get(f"model.{key}")
        if meta is None:
            raise ConfigError("--resume", f"the checkpoint in '{path}' has no '{key}': it was written for another "
                                          f"model; use another output.dir or drop --resume")
        if tuple(meta.size) != tuple(tensor.shape):
            # zeros, not empty: loaders may derive state from what they receive (a cache's bitmap from its ids)
            resized[key] = torch.zeros(tuple(meta.size), dtype=tensor.dtype)
    if resized:   # modules whose tensors change size (FIITED stores) take the saved sizes from their loader
        try:
            with adopting_shapes():
                model.load_state_dict(resized, strict=False)
        except RuntimeError as e:
            raise ConfigError("--resume", f"the checkpoint in '{path}' does not fit this model: "
                                          f"{str(e).splitlines()[-1].strip()}") from None
    optimizer = make_optimizer()
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer)}
    rng_key = f"rng.{coll.rank}"
    if rng_key in saved:
        state[rng_key] = torch.get_rng_state()
    dcp.load(state, checkpoint_id=path, process_group=coll.group)
    # dcp.load wrote the parameters and buffers in place; state that a module keeps elsewhere (random generators'
    # states) came into the dict's copies: hand those to the modules' loaders
    held = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    extra = {k: v for k, v in state["model"].items() if k not in held}
    if extra:
        model.load_state_dict(extra, strict=False)
    for module in model.modules():   # and rebuild what is derived from the tensors written in place
        rebuild = getattr(module, "rebuild_derived", None)
        if callable(rebuild):
            rebuild()
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if rng_key in state:
        torch.set_rng_state(state[rng_key])
    return optimizer
