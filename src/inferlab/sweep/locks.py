"""One measurement at a time per device, whoever runs it.

Hydra's process launchers and `dvc queue start -j N` run several sweep jobs at once on one host;
two points measured at once on one device would disturb each other's timings. So a point holds
an exclusive lock for its device (the CPU, or the GPU CUDA_VISIBLE_DEVICES names): a flock any
user of the host can open (inferlab.hostlock), released by the kernel if the holder dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inferlab import NO_MULTICAST  # noqa: F401  (set in every process that imports inferlab)
from inferlab.hostlock import lock_dir, open_lock

log = logging.getLogger(__name__)

_HELD: dict[str, object] = {}  # device keys this process holds for its whole run (a claimed GPU)


def device_key(runtime_device: str) -> str:
    """'cpu', or 'gpu-<id>' for the first GPU this process sees."""
    if runtime_device != "cuda":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", visible)


def lock_path(key: str) -> Path:
    return lock_dir() / f"inferlab-{key}.lock"


@contextmanager
def device_lock(key: str) -> Iterator[float]:
    """Hold the device's lock; yields the seconds waited. INFERLAB_DEVICE_LOCK=0: no lock."""
    # a claimed GPU is ours already
    if os.environ.get("INFERLAB_DEVICE_LOCK", "1") == "0" or key in _HELD:
        yield 0.0
        return
    fd = open_lock(lock_path(key))
    try:
        t0 = time.perf_counter()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another sweep point is being measured on it", key)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - t0
    finally:
        os.close(fd)  # releases the lock


def _busy(key: str) -> bool:
    """Whether another process holds this device's lock right now (a non-blocking probe)."""
    path = lock_path(key)
    if key in _HELD or not path.exists():
        return False
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def visible_gpus() -> list[str]:
    """The GPUs this host offers the sweep: $INFERLAB_GPUS (e.g. "0,1"), else a non-empty
    $CUDA_VISIBLE_DEVICES, else every GPU `nvidia-smi -L` lists; [] without GPUs."""
    for var in ("INFERLAB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var, "").strip()
        if value:
            return [g.strip() for g in value.split(",") if g.strip()]
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        out = r.stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def others_busy(key: str, gpus: list[str] | None = None) -> list[str]:
    """The other GPUs of `gpus` (default visible_gpus()) whose lock someone else holds now.

    Pass the host's GPUs where this process narrowed CUDA_VISIBLE_DEVICES to one."""
    if not key.startswith("gpu-"):
        return []
    keys = [f"gpu-{g}" for g in (visible_gpus() if gpus is None else gpus)]
    return [k for k in keys if k != key and _busy(k)]


@contextmanager
def claim_gpu(gpus: list[str] | None = None) -> Iterator[str | None]:
    """Claim one free GPU of `gpus` for this process and its workers until the block ends.

    Its lock is held and CUDA_VISIBLE_DEVICES names only it; under `hydra/launcher=gpus` each job
    takes its own GPU, waiting if all are taken. With one GPU or none, yields None."""
    gpus = visible_gpus() if gpus is None else gpus
    if len(gpus) < 2 or os.environ.get("INFERLAB_GPU_CLAIM", "1") == "0":
        yield None
        return
    lock_dir().mkdir(parents=True, exist_ok=True)
    waited, t0 = False, time.perf_counter()
    while True:
        for g in gpus:
            f = open_lock(lock_path(f"gpu-{g}"))  # held for the whole block
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(f)
                continue
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = g
            _HELD[f"gpu-{g}"] = f
            log.info("claimed GPU %s of %s%s", g, ",".join(gpus),
                     f" after waiting {time.perf_counter() - t0:.0f} s" if waited else "")
            try:
                yield g
            finally:
                _HELD.pop(f"gpu-{g}", None)
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
                os.close(f)  # releases the lock
            return
        if not waited:
            log.info("every GPU (%s) is taken by another sweep job; waiting for one",
                     ",".join(gpus))
            waited = True
        time.sleep(1.0)
