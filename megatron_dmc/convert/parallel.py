"""Run a conversion step on TP x PP local gloo processes (spawned here; no torchrun needed).

Workers are not daemonic: Megatron's checkpoint writer starts helper processes of its own.
"""

from __future__ import annotations

import pickle
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from megatron_dmc.distributed import (
    destroy_distributed,
    free_port,
    initialize_distributed,
    local_rank_context,
    set_local_rank_env,
)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    sizes: tuple[int, int],
    call: bytes,
    results: Any,
) -> None:
    set_local_rank_env(rank, world, port)
    try:
        initialize_distributed(*sizes)
        results.put((rank, None, fn(*pickle.loads(call))))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        destroy_distributed()


CONVERT_PRELOAD = ("megatron_dmc.convert.writer", "megatron_dmc.convert.commands")
"""What the converter's ranks import, preloaded by the fork server they start from."""


def run_parallel(
    fn: Callable[..., Any],
    tensor_parallel: int,
    pipeline_parallel: int,
    args: Sequence[Any] = (),
    timeout_s: float = 24 * 3600.0,
) -> list[Any]:
    """`fn(*args)` on every rank of a TP x PP world; results by rank, or RuntimeError."""
    world = tensor_parallel * pipeline_parallel
    ctx = local_rank_context(CONVERT_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    sizes = (tensor_parallel, pipeline_parallel)
    call = pickle.dumps(tuple(args))  # by value: a fork server passes few file descriptors
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world, port, sizes, call, results))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    try:
        return _collect(procs, results, timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _collect(procs: list[Any], results: Any, timeout_s: float) -> list[Any]:
    outcomes: dict[int, Any] = {}
    waited = 0.0
    while len(outcomes) < len(procs):
        try:
            rank, error, value = results.get(timeout=1.0)
        except queue.Empty:
            waited += 1.0
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if (dead and results.empty()) or waited > timeout_s:
                raise RuntimeError(f"conversion worker died or hung (exit codes {dead})") from None
            continue
        if error is not None:
            raise RuntimeError(f"conversion rank {rank} failed:\n{error}")
        outcomes[rank] = value
    return [outcomes[rank] for rank in range(len(procs))]
