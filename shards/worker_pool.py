"""The worker processes of the converter and the verifier: a multiprocessing Pool whose workers end
on SIGTERM whatever handler their parent process had, and leave Ctrl-C to their parent."""

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

    Ctrl-C reaches every process of the terminal's group: the workers ignore it (each would print a
    KeyboardInterrupt traceback), and the parent's KeyboardInterrupt ends the Pool, which stops them.
    """
    return Pool(processes, initializer=_leave_signals_to_the_parent)


def _leave_signals_to_the_parent() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
