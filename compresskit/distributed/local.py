"""Running a function on N local processes joined by gloo on 127.0.0.1 (tests, benchmarks, small experiments).

``run_local(fn, world, args)`` starts ``world`` spawned processes, each initialising the default process group
(gloo, loopback only, with a timeout) and calling ``fn(rank, world, *args)``; it returns the results in rank order.
Everything is bounded: a rank that fails raises here with its traceback, and a run past ``timeout`` is killed.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, args: Sequence[Any], result: Any,
               timeout: float, threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        # plain pickle: torch's queue would share tensors through file descriptors that die with this process
        result.send((True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:   # reported to the parent, which raises it
        result.send((False, traceback.format_exc()))
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        result.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)   # gloo can leave a thread that aborts a normal interpreter shutdown


def run_local(fn: Callable[..., Any], world: int, args: Sequence[Any] = (), *, timeout: float = 120.0,
              threads: int = 1) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each call in its own process of one gloo
    process group on 127.0.0.1 with ``threads`` torch threads. ``fn`` and ``args`` must be picklable (``fn`` at
    module level). Raises RuntimeError with the first failed rank's traceback, TimeoutError after ``timeout``
    seconds (every process is killed)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, tuple(args), pipes[rank][1], timeout,
                                                  threads), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_local: {world - len(out)} of {world} ranks did not finish in {timeout:g} s")
            for rank, (recv, _) in enumerate(pipes):
                if rank in out or not recv.poll(0.05):
                    continue
                try:
                    ok, value = recv.recv()
                except EOFError:
                    raise RuntimeError(f"run_local: rank {rank} exited with status {procs[rank].exitcode} "
                                       f"without a result") from None
                if not ok:
                    raise RuntimeError(f"run_local: rank {rank} failed:\n{value}")
                out[rank] = pickle.loads(value)   # our own child's result
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [out[r] for r in range(world)]
