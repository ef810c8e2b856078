"""Joining a torchrun launch, agreeing on errors across ranks, and ``compresskit apply --nproc N``.

``torchrun`` (``torch.distributed.run``) starts the processes and sets ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR``; :func:`connect` joins its rendezvous. A user error found on one rank is made every rank's error by
:func:`agreement` (an all-gather of each rank's outcome), so all ranks stop with the same one-line message instead
of waiting for each other; every collective also has the recipe's ``distributed.timeout_s``.
"""
from __future__ import annotations

import datetime
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import CompressKitError, ConfigError
from . import launched_world
from .collective import Collective


LOST_CONTACT = 3      # exit status of a rank whose peer died or whose collective timed out
STOPPED = 143         # exit status of a rank the launcher stopped (SIGTERM turned into RankStopped)
CONSEQUENCES = (LOST_CONTACT, STOPPED, -signal.SIGTERM)


class RankStopped(CompressKitError):
    """This rank was told to stop: the launcher ends the other ranks with SIGTERM when one fails."""


def connect(cfg: Any = None) -> Collective:
    """Join the torchrun launch this process belongs to (a one-process :class:`Collective` if none): initialise
    the default process group and a second group for the embedding exchange, both with ``cfg.timeout_s``."""
    world = launched_world()
    if world <= 1:
        return Collective.single()
    backend = getattr(cfg, "backend", "auto")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=float(getattr(cfg, "timeout_s", 300.0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    _stop_on_sigterm()
    tables = dist.new_group(backend=backend, timeout=timeout)
    prefetch = dist.new_group(backend=backend, timeout=timeout)
    return Collective(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, tables, backend, prefetch)


def disconnect(coll: Collective) -> None:
    """Leave the process group (after the last collective of a run)."""
    if coll.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _stop_on_sigterm() -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: turn it into a clear one-line error."""
    def stop(signum: int, frame: Any) -> None:
        raise RankStopped("stopped by the launcher: another rank failed (its error is above)")

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, stop)


@contextmanager
def agreement(coll: Collective) -> Iterator[None]:
    """Run a block of local work (no collectives inside) on every rank, then all-gather the outcomes: if any rank
    failed with a user error, every rank raises that error, prefixed with the rank that found it."""
    error: BaseException | None = None
    try:
        yield
    except Exception as e:   # gathered below so that the other ranks stop too, then re-raised
        error = e
    if coll.distributed:
        outcomes = coll.all_gather_object(None if error is None else
                                          (isinstance(error, CompressKitError),
                                           (str(error).splitlines() or [type(error).__name__])[0]))
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed:
            rank, (user, message) = failed[0]
            if error is not None and not isinstance(error, CompressKitError) and rank == coll.rank:
                raise error     # a bug, not a user error: this rank keeps its traceback
            raise ConfigError(f"rank {rank}", message if user else f"failed: {message}") from None
    if error is not None:
        raise error


def same_everywhere(coll: Collective, value: str, what: str) -> None:
    """Fail on every rank unless every rank holds the same ``value`` (e.g. a hash of the recipe)."""
    values = coll.all_gather_object(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise ConfigError(f"rank {odd[0]}", f"its {what} differs from rank 0's; give every rank the same {what}")


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``compresskit <argv>`` on ``nproc`` local processes through ``torch.distributed.run`` (torchrun
    ``--standalone``); returns the exit status (that of the first failed rank)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--monitor-interval=0.2",
                                         "-m", "compresskit", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        # the launcher ends the survivors with SIGTERM, and a rank that lost its peer exits with LOST_CONTACT: the
        # cause is a rank that failed otherwise (both can be seen in the same monitor tick)
        rank, first = min(e.failures.items(), key=lambda item: (item[1].exitcode in CONSEQUENCES,
                                                                item[1].timestamp, item[0]))
        if first.exitcode < 0:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        else:
            how = f"failed with exit status {first.exitcode} (its message is above)"
        print(f"error: rank {rank} of {nproc} {how}; {len(e.failures)} rank(s) stopped; resume from the last "
              f"checkpoint with --resume", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return 0
