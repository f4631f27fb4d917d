"""An exclusive lock on a folder, held while this process lives: the converter's `--out`, a run's
`run.dir`. A second job writing there (a command started twice, a job submitted twice) is refused
instead of interleaving its files with the first's."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import TextIO


class FolderInUse(Exception):
    """Another process holds the lock; the message says which (its pid, host and start time)."""


def lock_folder(folder: Path, lock_name: str) -> TextIO:
    """Lock `folder/lock_name` and keep the returned file open for as long as the lock must hold.

    The kernel drops the lock when the process ends, however it ends: no stale lock to clear. On a
    filesystem without locks, a note says so and the work goes on unguarded."""
    path = folder / lock_name
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not said which"
        handle.close()
        raise FolderInUse(holder) from None
    except OSError as err:
        print(f"note: cannot lock {path} ({err.strerror}): a second job writing to {folder} would go unnoticed")
        return handle
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
