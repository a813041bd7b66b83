"""One measurement at a time per device, whoever runs it.

Hydra's process launchers (submitit_local, joblib) and `dvc queue start -j N` run several sweep jobs at once on
one host. Each job keeps its own process (memory isolation), but two points measured at the same time on the
same device would disturb each other's timings. So a point is measured while holding an exclusive lock for its
device: the host's CPU for CPU points, the GPU (as CUDA_VISIBLE_DEVICES names it) for GPU points, so one point
per GPU runs at a time. The lock is a flock on a file: released by the kernel if the holder dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def lock_dir() -> Path:
    return Path(os.environ.get("INFERLAB_LOCK_DIR") or tempfile.gettempdir())


def device_key(runtime_device: str) -> str:
    """'cpu', or 'gpu-<id>' for the first GPU this process sees."""
    if runtime_device != "cuda":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", visible)


@contextmanager
def device_lock(key: str) -> Iterator[float]:
    """Hold the device's lock; yields how long it waited for it (seconds). INFERLAB_DEVICE_LOCK=0 turns it off."""
    if os.environ.get("INFERLAB_DEVICE_LOCK", "1") == "0":
        yield 0.0
        return
    path = lock_dir() / f"inferlab-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        t0 = time.perf_counter()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another sweep point is being measured on it", key)
            fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
