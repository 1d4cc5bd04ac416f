"""Run a test body in N gloo processes on 127.0.0.1 and bring failures back to pytest.

    from tests.dist_utils import run_distributed

    def _body(tp: int) -> float:          # module level, so spawn can pickle it
        initialize_distributed(tensor_model_parallel_size=tp)
        ...
        return some_picklable_result

    def test_tp2():
        results = run_distributed(_body, world_size=2, args=(2,))   # one per rank

Each process gets torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK), one intra-op thread, and `destroy_distributed()` afterwards. Ranks are
forked from the session's fork server (`megatron_dmc.distributed.local_rank_context`),
which imported megatron-core once; they still import `fn`'s module and start gloo, so
put several checks into one body rather than one per test.
Ranks are not daemonic (as under torchrun), so they may start processes of their own,
e.g. the writers of a torch_dist checkpoint save. An exception or failed assert in any
rank fails the calling test with that rank's traceback; a rank that hangs past
`timeout_s` is killed and the test fails.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_dmc.distributed import set_local_rank_env


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    call: bytes,
    results: Any,
) -> None:
    """`call` holds the arguments pickled by value: handed to the fork server as objects,
    every tensor would travel as a shared-memory file descriptor, and one message carries
    at most 253 of them."""
    set_local_rank_env(rank, world_size, port)
    torch.set_num_threads(1)
    try:
        args, kwargs = pickle.loads(call)
        results.put((rank, True, fn(*args, **kwargs)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            from megatron_dmc.distributed import destroy_distributed

            destroy_distributed()


def _collect(procs: list, results: Any, world_size: int, deadline: float) -> dict[int, Any]:
    outcomes: dict[int, Any] = {}
    while len(outcomes) < world_size:
        try:
            rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.time())))
        except queue.Empty:
            if time.time() > deadline:
                raise AssertionError(
                    f"distributed test timed out; ranks done: {sorted(outcomes)}"
                ) from None
            silent = [p.exitcode for r, p in enumerate(procs) if r not in outcomes]
            if all(code is not None for code in silent) and results.empty():
                raise AssertionError(
                    f"ranks exited without reporting (exit codes {silent})"
                ) from None
            continue
        if not ok:
            raise AssertionError(f"rank {rank} failed:\n{value}")
        outcomes[rank] = value
    return outcomes


def _kill_tree(proc: Any) -> None:
    """Kill a hung rank and the processes it started (checkpoint writers, managers)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    proc.join()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout_s: float = 180.0,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` spawned ranks; return results by rank."""
    from megatron_dmc.convert.parallel import CONVERT_PRELOAD
    from megatron_dmc.distributed import free_port, local_rank_context

    ctx = local_rank_context(CONVERT_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    call = pickle.dumps((tuple(args), dict(kwargs or {})))  # tensors by value, see _worker
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, call, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = _collect(procs, results, world_size, time.time() + timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                _kill_tree(proc)
    return [outcomes[rank] for rank in range(world_size)]
