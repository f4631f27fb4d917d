"""The worker processes of the converter and the verifier: a multiprocessing Pool whose workers end
on SIGTERM whatever handler their parent process had."""

from __future__ import annotations

import signal
from multiprocessing import Pool
from multiprocessing.pool import Pool as PoolType


def worker_pool(processes: int) -> PoolType:
    """`multiprocessing.Pool(processes)`, with SIGTERM's default action restored in each worker.

    A Pool's `terminate()`, which ends every `with Pool(...)` block, stops its workers with SIGTERM
    while it holds the lock of their task queue. Forked workers inherit the caller's signal
    handlers; one that returns (a job runner's, a training loop's that checkpoints first) leaves a
    worker alive, waiting for that lock, and the Pool waits for the worker for ever.
    """
    return Pool(processes, initializer=_end_on_sigterm)


def _end_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
