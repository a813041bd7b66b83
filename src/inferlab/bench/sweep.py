"""Running a sweep: points in worker processes, one record per point, progress with ETA, resume.

Resume: a sweep writes a manifest (its id and a digest of the code) before the first point. If the stage is
interrupted at any moment until it has finished (its points measured, its records logged to MLflow, its
aggregates written), rerunning the same sweep (same points, same code, same hardware) continues it: the points
that have a record of it in the records file are not measured again. A finished sweep is never resumed: when
DVC reruns the stage (its params or code changed), every point is measured anew.

A Hydra multirun (`-m`) is one sweep of many jobs: its manifest is keyed by the multirun's own overrides, every
job adds itself when it has finished, and the multirun is finished when all its jobs are.

Only one process runs a sweep (or a job of a multirun) at a time: it holds an exclusive flock on a lock file
for its whole life, and the file names it (pid, host, boot, start). A second start of the same sweep refuses at
once, naming the live one, and measures nothing; a holder that died released its lock with its process.

With several GPUs (`slots`), one thread per GPU takes points from a shared queue as its GPU frees up, each GPU's
workers pinned to its own cores; records are still written one at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import inferlab
from inferlab import records as rec
from inferlab import slurm
from inferlab.bench.lock import device_lock, lock_path, others_busy
from inferlab.bench.memory import roofline
from inferlab.bench.placement import Slot
from inferlab.bench.worker import Worker
from inferlab.hostlock import boot_id, open_lock
from inferlab.stage import CannotStart, Interrupted, StageRun, Stopped, StorageError, multirun

log = logging.getLogger(__name__)


@dataclass
class Point:
    name: str  # readable: q4_k_m-t2-b512-fa0-kvf16-generate-p64
    runtime: str  # backend name
    group: tuple  # points of one group share a worker process (one loaded model)
    settings: dict[str, Any]  # everything that defines the measurement (and goes into point_id)
    load: dict[str, Any] = field(default_factory=dict)  # worker load settings not part of the identity (paths)
    skip: str | None = None  # why this point cannot run here (recorded as skipped)

    def identity(self) -> dict[str, Any]:
        return {"runtime": self.runtime, **self.settings}


def code_digest(extra: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(inferlab.__file__).parent.rglob("*.py")) + sorted(extra):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _point_id(stage: StageRun, p: Point) -> str:
    return rec.point_id(stage.stage, {"model": stage.model["name"], **p.identity()})


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


class SweepBusy(CannotStart):
    """The same sweep is being run by another process right now."""


def _take(path: Path, wait: bool) -> int | None:
    """An exclusive flock on `path` (created if missing); its descriptor, or None when another process holds it
    and `wait` is false. A holder removes the file when it is done: a lock taken on a file that is no longer
    the one at `path` is dropped and taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)  # while still holding it: whoever waits on the old file takes the new one
    os.close(fd)


class SweepState:
    """The manifest of one sweep (its id; for a multirun, its jobs done) and this process's claim on running it.

    Files beside the records: `.sweep-<key>.json` (the manifest), `.sweep-<key>.lock` (held while the manifest is
    read and changed: jobs of a multirun may start together) and `.sweep-<key>-<job>.lock` (held by the process
    that runs these points, for its whole life). <key> names the sweep: a digest of the code, the hardware and its
    points (a multirun: its overrides); <job> names this run's points.
    """

    def __init__(self, folder: Path, stage: StageRun, points: list[Point], digest: str):
        self.ids = sorted(_point_id(stage, p) for p in points)
        self.stage = stage
        hw = stage.env["hardware"]["id"]
        self.multirun = multirun()
        if self.multirun is None:
            key = _digest([digest, hw, self.ids])
        elif self.multirun.jobs:
            key = _digest([digest, hw, stage.stage, "multirun", sorted(self.multirun.overrides)])
        else:  # jobs unknown: this multirun only, not resumed by a rerun
            key = _digest([digest, hw, stage.stage, self.multirun.name, self.ids])
        self.job = _digest(self.ids)
        self.digest = digest
        self.path = folder / f".sweep-{key}.json"
        self.mutex = folder / f".sweep-{key}.lock"
        self.live = folder / f".sweep-{key}-{self.job}.lock"
        self.sweep_id = ""
        self._live_fd: int | None = None

    @contextmanager
    def _manifest(self) -> Iterator[dict[str, Any] | None]:
        fd = _take(self.mutex, wait=True)
        assert fd is not None
        try:
            yield json.loads(self.path.read_text()) if self.path.exists() else None
        finally:
            os.close(fd)

    def _write(self, data: dict[str, Any]) -> None:
        rec.write_json(self.path, {**data, "code_digest": self.digest, "updated": rec.now()})

    def start(self, retry_failed: bool) -> set[str]:
        """Claim these points (SweepBusy if a live process runs them), join or resume the sweep they belong to,
        and return the ids of the points that already have a finished record of it."""
        fd = _take(self.live, wait=False)
        if fd is None:
            raise SweepBusy(self._busy_message())
        self._live_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(),
                                 "started": rec.now(), "sweep": self.stage.stage}).encode())
        self.stage.on_close(self.close)
        with self._manifest() as data:
            if data is None or data.get("status") != "running":
                data = {"sweep_id": self.stage.sweep_id, "status": "running", "points": [], "jobs_done": []}
            data["points"] = sorted(set(data.get("points", [])) | set(self.ids))
            if self.multirun is not None:
                data["jobs"] = self.multirun.jobs
            self._write(data)
        self.sweep_id = data["sweep_id"]
        if self.sweep_id == self.stage.sweep_id:  # a new sweep (or a job of the multirun that started it)
            return set()
        finished = ("ok", "skipped") if retry_failed else ("ok", "skipped", "failed")
        mine, others = set(self.ids), set(data["points"]) - set(self.ids)  # others: other jobs' points
        earlier = [r for r in rec.read(self.stage.path) if r.sweep_id == self.sweep_id and r.point_id not in others]
        done = {r.point_id for r in earlier if r.point_id in mine and r.status in finished}
        # every record this run made before (a stage's own records beside its points': evaluate's scores)
        self.stage.resume(self.sweep_id, [r for r in earlier if r.point_id in done or r.point_id not in mine])
        log.info("resuming interrupted sweep %s: %d of %d points already finished", self.sweep_id, len(done),
                 len(self.ids))
        return done

    def _busy_message(self) -> str:
        try:
            who = json.loads(self.live.read_text())
            holder = f"pid {who['pid']} on {who['host']}, started {who['started']}"
        except (OSError, ValueError, KeyError):
            holder = "another process"
        return (f"the same {self.stage.stage} sweep ({len(self.ids)} points, same code and settings) is running "
                f"now ({holder}); nothing was run. Wait for it to finish, or stop it and rerun this command to "
                "resume it")

    def complete(self) -> None:
        """The stage finished: every point of this run must have a record of the sweep in the file (else the
        sweep stays open, so a rerun measures what is missing). Then this job is done, and the sweep complete
        once all its jobs are."""
        present = {r.point_id for r in rec.read(self.stage.path) if r.sweep_id == self.sweep_id}
        missing = [i for i in self.ids if i not in present]
        if missing:
            raise Stopped(f"{len(missing)} of {len(self.ids)} points of sweep {self.sweep_id} have no readable "
                          f"record in {self.stage.path}; the sweep stays open: rerun to measure them")
        with self._manifest() as data:
            data = data or {"sweep_id": self.sweep_id, "points": self.ids}
            jobs_done = sorted(set(data.get("jobs_done", [])) | {self.job})
            whole = self.multirun is None or len(jobs_done) >= (data.get("jobs") or 1)
            self._write({**data, "jobs_done": jobs_done, "status": "complete" if whole else "running"})
            if whole:
                self.mutex.unlink(missing_ok=True)  # held: a process waiting for it takes a new one

    def close(self) -> None:
        if self._live_fd is not None:
            _release(self._live_fd, self.live)
            self._live_fd = None


class PointQueue:
    """The points still to run, handed out one at a time to whichever slot (GPU) is free: a slot keeps to the
    model its worker has loaded; when that has no point left it starts a model no other slot holds, and when
    every model is taken it helps with the one that has the most points left (a second load of it, rather
    than an idle GPU)."""

    def __init__(self, points: list[Point]):
        self._groups: dict[tuple, list[Point]] = {}
        for p in points:
            self._groups.setdefault(p.group, []).append(p)
        self._held: dict[int, tuple] = {}  # slot -> the group its worker holds
        self._lock = threading.Lock()

    def take(self, slot: int, loaded: tuple | None) -> Point | None:
        with self._lock:
            live = [g for g, ps in self._groups.items() if ps]
            if not live:
                self._held.pop(slot, None)
                return None
            if loaded not in live:
                others = {g for s, g in self._held.items() if s != slot}
                fresh = [g for g in live if g not in others]
                loaded = fresh[0] if fresh else max(live, key=lambda g: len(self._groups[g]))
            self._held[slot] = loaded
            return self._groups[loaded].pop(0)


class _Beside:
    """Which other slots of this process measured while a point ran (from its start to its end)."""

    def __init__(self) -> None:
        self._running: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def start(self, key: str) -> None:
        with self._lock:
            for other in self._running.values():
                other.add(key)
            self._running[key] = set(self._running)

    def stop(self, key: str) -> set[str]:
        with self._lock:
            return self._running.pop(key)


class _Sweep:
    """One sweep's shared state across its slots: the queue, progress, and the records (written one at a time)."""

    def __init__(self, stage: StageRun, points: list[Point], total: int, folder: Path, bandwidth: dict,
                 timeout: float, roofline_of: Callable[[dict], float | None], slots: list[Slot]):
        self.stage, self.queue, self.total, self.folder = stage, PointQueue(points), total, folder
        self.bandwidth, self.timeout, self.roofline_of, self.slots = bandwidth, timeout, roofline_of, slots
        self.beside = _Beside()
        self.n_done, self.t0 = 0, time.perf_counter()
        self.lock = threading.Lock()
        self.workers: dict[int, Worker] = {}  # slot -> its worker process
        self.stopping = threading.Event()

    def record(self, p: Point, status: str, payload: dict, started: float, where: str = "",
               started_at: str = "") -> None:
        with self.lock:
            _record(self.stage, p, status, payload, self.bandwidth, self.roofline_of, started_at or rec.now_ms())
            self.n_done += 1
            left = self.total - self.n_done
            eta = (time.perf_counter() - self.t0) / self.n_done * left
            why = f" ({payload['reason'].splitlines()[0][:100]})" if status != "ok" and payload.get("reason") else ""
            log.info("[%d/%d] %s%s: %s%s in %.1f s (%d left, about %s to go)", self.n_done, self.total, p.name,
                     where, status, why, time.perf_counter() - started, left, _fmt(eta))

    def run_slot(self, i: int) -> None:
        """Take points from the queue and measure them on slot i until none is left, or the sweep stops."""
        slot = self.slots[i]
        group: tuple | None = None
        while not self.stopping.is_set() and (p := self.queue.take(i, group)) is not None:
            started, started_at = time.perf_counter(), rec.now_ms()
            worker = self.workers.get(i)
            if worker is not None and p.group != group:
                worker.stop()  # the model it held is done here: free its memory first
                worker = None
            group = p.group
            if worker is None:
                worker = self.workers[i] = Worker(p.runtime, p.load, slot.env(), list(slot.cpus) or None)
            key = slot.key(_device(p))
            gpus = list(slot.host_gpus) if slot.gpu is not None else None
            try:
                with device_lock(key) as waited:  # one point measured per device at a time, across processes
                    held = time.perf_counter()
                    self.beside.start(key)
                    beside = set(others_busy(key, gpus))  # other GPUs measuring at the same time (a parallel sweep)
                    status, payload = worker.run(p.settings, p.name, str(self.folder), self.timeout,
                                                 {**p.load, "sweep_id": self.stage.sweep_id})
                    beside |= set(others_busy(key, gpus)) | self.beside.stop(key)
                    held = time.perf_counter() - held
            except BaseException as e:  # stopped mid-point: failed only at its Slurm job's time limit
                worker.kill()
                if isinstance(e, Exception) and (why := slurm.time_limit_reason(e)):
                    self.record(p, "failed", {"reason": why}, started, "", started_at)
                raise
            if self.stopping.is_set() or worker.signalled():
                raise Interrupted(worker.signalled() or signal.SIGTERM)  # its point was not measured: no record
            metrics = payload.setdefault("metrics", {})
            metrics["device_lock"] = {"device": key, "waited_s": round(waited, 3), "others_busy": sorted(beside),
                                      "held_s": round(held, 3), "released_at": round(time.time(), 3)}
            if slot.gpu is not None:
                metrics["placement"] = {**slot.describe(len(self.slots)), "observed": metrics.pop("placement", None)}
            if status == "failed":  # a clean process (and device) for what follows
                worker.kill()
                self.workers.pop(i, None)
            self.record(p, status, payload, started, f" on {key}" if len(self.slots) > 1 else "", started_at)
        worker = self.workers.pop(i, None)
        if worker is not None:
            worker.stop()

    def stop(self) -> None:
        """Interrupted: no slot takes another point, and every worker is stopped now."""
        self.stopping.set()
        for worker in list(self.workers.values()):
            worker.kill()
        self.workers.clear()


def run_sweep(stage: StageRun, points: list[Point], folder: Path, bandwidth: dict | Callable[[], dict],
              timeout: float, retry_failed: bool, extra_code: list[Path], roofline_of: Callable[[dict], float | None],
              slots: list[Slot] | None = None) -> None:
    """Run every point not yet finished in this sweep; append one record per point. `bandwidth` may be the
    function that measures it: called once the sweep is claimed and has points to run (a refused second start,
    or a resumed sweep with nothing left, measures nothing). `slots`: the GPUs to run on at once (one point per
    GPU at a time, each GPU's workers on its own cores); default: one point at a time on the device each point
    names."""
    slots = slots or [Slot()]
    placement = ",".join(f"gpu-{s.gpu}" for s in slots if s.gpu is not None)
    for key in sorted({s.key(_device(p)) for s in slots for p in points if not p.skip}):
        try:  # a lock file this user cannot open fails the sweep now, not at its first point
            os.close(open_lock(lock_path(key)))
        except OSError as e:
            raise StorageError(f"the {key} lock {lock_path(key)} cannot be opened ({e.strerror or e}); nothing was "
                               "run. Set INFERLAB_LOCK_DIR to a folder every user of this host can write") from None
    digest = code_digest(extra_code)
    state = SweepState(stage.path.parent, stage, points, _digest([digest, placement]) if placement else digest)
    done = state.start(retry_failed)
    stage.when_finished(state.complete)  # after the stage's own work and MLflow logging, not before

    todo = [p for p in points if _point_id(stage, p) not in done]
    if callable(bandwidth):
        bandwidth = bandwidth() if any(not p.skip for p in todo) else {}
    to_run = [p for p in todo if not p.skip]
    sweep = _Sweep(stage, to_run, len(todo), folder, bandwidth, timeout, roofline_of, slots)
    log.info("sweep %s: %d points to run (%d finished earlier), in %d worker group(s)%s", stage.sweep_id, len(todo),
             len(done), len({p.group for p in to_run}), f" on {placement} at once" if len(slots) > 1 else "")
    for p in todo:
        if p.skip:
            sweep.record(p, "skipped", {"reason": p.skip}, time.perf_counter())
    if len(slots) > 1:
        read_once(to_run)
    try:
        _run_slots(sweep)
    except BaseException:
        sweep.stop()
        raise


def _run_slots(sweep: _Sweep) -> None:
    """Every slot measures in a thread of its own (one slot: in this thread); an error in one stops the sweep
    once the others are done with their points (the manifest stays 'running': a rerun resumes)."""
    if len(sweep.slots) == 1:
        sweep.run_slot(0)
        return
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            sweep.run_slot(i)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"slot-{i}", daemon=True)
               for i in range(len(sweep.slots))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(1.0)
    if errors:
        raise errors[0]


def read_once(points: list[Point]) -> None:
    """Read the model files of the points into the page cache once, before GPUs load them side by side: each
    file comes from the disk once per host, and the loads that follow read it from memory."""
    files: set[Path] = set()
    for p in points:
        for key in ("model_dir", "model_path"):
            path = Path(p.load[key]) if p.load.get(key) else None
            if path is not None and path.is_dir():
                files.update(f for f in path.rglob("*") if f.is_file())
            elif path is not None and path.is_file():
                files.add(path)
    t0, size = time.perf_counter(), 0
    for f in sorted(files):
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    size += len(chunk)
        except OSError as e:
            log.warning("could not read %s ahead of the loads: %s", f, e)
    if files:
        log.info("model files read once into the page cache: %d files, %.1f GiB in %.1f s", len(files),
                 size / 2**30, time.perf_counter() - t0)


def _device(p: Point) -> str:
    """Where a point computes: cuda for transformers on CUDA or llama.cpp with offloaded layers, else cpu."""
    if p.settings.get("device") == "cuda" or (p.runtime == "llama_cpp" and p.settings.get("n_gpu_layers")):
        return "cuda"
    return "cpu"


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _record(stage: StageRun, p: Point, status: str, payload: dict, bandwidth: dict,
            roofline_of: Callable[[dict], float | None], started: str) -> None:
    metrics = payload.get("metrics", {})
    if status == "ok" and "weight_bytes" in metrics and "bandwidth_gbps" in bandwidth:
        metrics["roofline"] = roofline(bandwidth["bandwidth_gbps"], metrics["weight_bytes"], roofline_of(metrics))
    if "traceback" in payload:
        metrics["traceback"] = payload["traceback"]
    if bandwidth:
        metrics["bandwidth"] = bandwidth
    stage.record(p.name, p.identity(), status=status, reason=payload.get("reason"), metrics=metrics,
                 samples=payload.get("samples", {}), artifacts=payload.get("artifacts", {}), started=started)
