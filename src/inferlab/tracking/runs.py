"""Whose a run is, whether it is complete or still being written, and which of two is kept."""

from __future__ import annotations

import os
import socket
import time

from inferlab.hostlock import boot_id
from inferlab.tracking.names import TAG_LOGGED, TAG_LOGGER

STALE_S = 600  # an unfinished run of a logger on another host is taken as dead after this long


def logger_id() -> str:
    return f"{socket.gethostname()}:{boot_id()}:{os.getpid()}"


def complete(run) -> bool:
    """Whether its logger finished the run (one it marked failed is not)."""
    return run.info.status in ("FINISHED", "FAILED") and run.data.tags.get(TAG_LOGGED) != "false"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def in_progress(run) -> bool:
    """An unfinished run a live logger still writes, so not to be replaced.

    Of this host: its process is alive; of another host: made less than STALE_S ago."""
    if complete(run):
        return False
    owner = run.data.tags.get(TAG_LOGGER, "")
    host, _, rest = owner.partition(":")
    boot, _, pid = rest.partition(":")
    if boot == boot_id():
        return pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))
    if not owner:
        return False  # made by a logger before this one: it finishes what it starts, so it died
    return time.time() - run.info.start_time / 1000 < STALE_S


def kept_first(run) -> tuple:
    """Sort key: of two runs of one record the first made is kept (the same in every process)."""
    return (run.info.start_time or 0, run.info.run_id)
