"""Preemption: SIGTERM/SIGINT ask the loop to checkpoint and stop at the next safe point.

If that does not happen within the grace period (a rank stuck in a collective because another
rank died), the process exits on its own, so a failed job never hangs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

FORCED_EXIT_STATUS = 143  # 128 + SIGTERM


class StopRequest:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._timer: threading.Timer | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopRequest:
        """Handle SIGTERM and SIGINT until `done()`, which puts the previous handlers back."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            os._exit(FORCED_EXIT_STATUS)
        self.signal_name = signal.Signals(signum).name
        print(
            f"received {self.signal_name}: saving and stopping at the next log interval "
            f"(forced exit in {self.grace_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        self._timer = threading.Timer(self.grace_s, self._force_exit)
        self._timer.daemon = True
        self._timer.start()

    def _force_exit(self) -> None:
        print(f"no clean stop within {self.grace_s:.0f} s of {self.signal_name}: exiting", file=sys.stderr, flush=True)
        os._exit(FORCED_EXIT_STATUS)

    def done(self) -> None:
        """Cancel the forced exit and restore the handlers `install` replaced. Left in place, they
        outlive the run in a process that called `train.trainer.main` and go on into the processes
        it forks: a multiprocessing Pool's terminate() then no longer ends its workers (it sends
        SIGTERM), and the test suite hung in tools.make_shards after an in-process training run."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
