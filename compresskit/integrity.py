"""Files you can trust: every checkpoint and ``model.pt`` is written with a SHA-256 sidecar and verified on load.

The sidecar ``<file>.sha256`` is in ``sha256sum`` format (``sha256sum -c model.pt.sha256`` checks it). Writing is
ordered so that no crash leaves a file its sidecar rejects: the payload goes to a temporary file and is hashed;
the sidecar is replaced by one accepting both the new and the current hash; the payload is renamed into place; the
sidecar is replaced by one accepting the new hash only. Loading hashes the file first, then reads it with
``torch.load(weights_only=True)``; a damaged, tampered, foreign or unreadable file is a one-line
:class:`~compresskit.errors.CheckpointError`, never a traceback and never a silent resume.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_write, write_text
from .errors import CheckpointError, first_line
from .optional import import_quietly

SUFFIX = ".sha256"


def sidecar(path: str | os.PathLike) -> Path:
    """The checksum file next to ``path``."""
    return Path(str(path) + SUFFIX)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def accepted_hashes(path: str | os.PathLike) -> list[str] | None:
    """The hashes the sidecar of ``path`` accepts (the current one first), or None without a sidecar."""
    side = sidecar(path)
    if not side.exists():
        return None
    hashes = []
    for line in side.read_text(encoding="utf-8", errors="replace").splitlines():
        word = line.split(" ", 1)[0].strip().lower()
        if len(word) == 64 and all(c in "0123456789abcdef" for c in word):
            hashes.append(word)
    return hashes


def _sidecar_text(hashes: list[str], name: str) -> str:
    return "".join(f"{h}  {name}\n" for h in hashes)


def publish(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically through ``write(temporary path)``, with its checksum sidecar (see the module
    docstring)."""
    path = Path(path)

    def finish(tmp: str) -> str:
        write(tmp)
        new = sha256_file(tmp)
        old = (accepted_hashes(path) or [])[:1] if path.exists() else []
        write_text(sidecar(path), _sidecar_text([new] + [h for h in old if h != new], path.name))
        return new

    new = atomic_write(path, finish)
    write_text(sidecar(path), _sidecar_text([new], path.name))
    return path


def save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with its checksum sidecar (see the module docstring)."""
    return publish(path, lambda tmp: torch.save(obj, tmp))


def verify(path: str | os.PathLike, *, required: bool) -> None:
    """Check ``path`` against its sidecar; without one, fail if ``required`` (a compresskit checkpoint always has
    one), pass otherwise (a state dict saved by plain PyTorch)."""
    hashes = accepted_hashes(path)
    if hashes is None:
        if required:
            raise CheckpointError(str(path), f"no checksum file '{sidecar(path).name}' next to it: compresskit "
                                             f"writes one with every checkpoint, so this file was not written by "
                                             f"compresskit or its checksum was removed; refusing to resume from it")
        return
    actual = sha256_file(path)
    if actual not in hashes:
        raise CheckpointError(str(path), f"checksum mismatch (sha256 {actual[:12]}..., "
                                         f"'{sidecar(path).name}' says {hashes[0][:12] if hashes else 'nothing'}...): "
                                         f"the file was damaged or changed after it was written; refusing to load it")


def load(path: str | os.PathLike, *, required: bool = True, _retried: bool = False) -> Any:
    """Verify ``path`` (:func:`verify`), then ``torch.load`` it with ``weights_only=True`` on the CPU; every
    failure is a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(str(path), "file not found")
    verify(path, required=required)
    try:
        with warnings.catch_warnings():   # torch warns about unusual pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "torchao" in str(e) and import_quietly("torchao")[0] is not None and not _retried:
            return load(path, required=required, _retried=True)   # torchao registers its tensor types on import
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.replace("WeightsUnpickler error:", "").strip() for ln in str(e).splitlines()]
        detail = next((ln for ln in lines if ln and not ln.startswith(skip)), type(e).__name__)
        raise CheckpointError(str(path), f"refused to unpickle it ({detail[:100]}): it is not a plain "
                                         f"file of tensors and containers; nothing in it was run") from None
    except Exception as e:  # truncated zip, text, random bytes: torch raises RuntimeError, EOFError, ...
        raise CheckpointError(str(path), f"not a readable PyTorch file ({type(e).__name__}: "
                                         f"{first_line(e, 120)})") from None
