"""Running a sweep: points in worker processes, one record per point, progress with ETA, resume
(sweep.resume).

With several GPUs (`slots`), one thread per GPU takes points from a shared queue as its GPU frees
up, each GPU's workers pinned to its own cores; records are still written one at a time."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from inferlab import records as rec
from inferlab import slurm
from inferlab.hostlock import open_lock
from inferlab.stage import Interrupted, StageRun, StorageError
from inferlab.sweep.locks import device_lock, lock_path, others_busy
from inferlab.sweep.memory import roofline
from inferlab.sweep.placement import Slot
from inferlab.sweep.points import Point
from inferlab.sweep.resume import SweepState, code_digest, point_id, short_digest
from inferlab.sweep.worker import Measure, Worker

log = logging.getLogger(__name__)


class PointQueue:
    """The points still to run, handed out one at a time to whichever slot (GPU) is free: a slot
    keeps to the model its worker has loaded; when that has no point left it starts a model no
    other slot holds, and when every model is taken it helps with the one that has the most points
    left (a second load of it, rather than an idle GPU)."""

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
    """One sweep's state across its slots: the queue, progress, the records (written one at a time)."""

    def __init__(self, stage: StageRun, points: list[Point], total: int, folder: Path, bandwidth: dict,
                 timeout: float, roofline_of: Callable[[dict], float | None], slots: list[Slot],
                 measure: Measure):
        self.stage, self.queue, self.total, self.folder = stage, PointQueue(points), total, folder
        self.bandwidth, self.timeout, self.roofline_of, self.slots = bandwidth, timeout, roofline_of, slots
        self.beside, self.measure = _Beside(), measure
        self.n_done, self.t0 = 0, time.perf_counter()
        self.lock = threading.Lock()
        self.workers: dict[int, Worker] = {}  # slot -> its worker process
        self.stopping = threading.Event()

    def record(self, p: Point, status: str, payload: dict, started: float, where: str = "",
               started_at: str = "") -> None:
        with self.lock:
            started_at = started_at or rec.now_ms()
            _record(self.stage, p, status, payload, self.bandwidth, self.roofline_of, started_at)
            self.n_done += 1
            left = self.total - self.n_done
            eta = (time.perf_counter() - self.t0) / self.n_done * left
            reason = payload.get("reason") if status != "ok" else None
            why = f" ({reason.splitlines()[0][:100]})" if reason else ""
            log.info("[%d/%d] %s%s: %s%s in %.1f s (%d left, about %s to go)", self.n_done,
                     self.total, p.name, where, status, why, time.perf_counter() - started, left,
                     _fmt(eta))

    def run_slot(self, i: int) -> None:
        """Measure points from the queue on slot i until none is left or the sweep stops."""
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
                worker = self.workers[i] = Worker(p.runtime, p.load, slot.env(), list(slot.cpus) or None,
                                                   measure=self.measure)
            key = slot.key(p.device())
            gpus = list(slot.host_gpus) if slot.gpu is not None else None
            try:
                # one point measured per device at a time, across processes
                with device_lock(key) as waited:
                    held = time.perf_counter()
                    self.beside.start(key)
                    # other GPUs measuring at the same time (a parallel sweep)
                    beside = set(others_busy(key, gpus))
                    status, payload = worker.run(p.settings, p.name, str(self.folder), self.timeout,
                                                 {**p.load, "sweep_id": self.stage.sweep_id})
                    beside |= set(others_busy(key, gpus)) | self.beside.stop(key)
                    held = time.perf_counter() - held
            # stopped mid-point: failed only at its Slurm job's time limit
            except BaseException as e:
                worker.kill()
                if isinstance(e, Exception) and (why := slurm.time_limit_reason(e)):
                    self.record(p, "failed", {"reason": why}, started, "", started_at)
                raise
            if self.stopping.is_set() or worker.signalled():
                # its point was not measured: no record
                raise Interrupted(worker.signalled() or signal.SIGTERM)
            metrics = payload.setdefault("metrics", {})
            metrics["device_lock"] = {"device": key, "waited_s": round(waited, 3),
                                      "others_busy": sorted(beside), "held_s": round(held, 3),
                                      "released_at": round(time.time(), 3)}
            if slot.gpu is not None:
                observed = metrics.pop("placement", None)
                metrics["placement"] = {**slot.describe(len(self.slots)), "observed": observed}
            if status == "failed":  # a clean process (and device) for what follows
                worker.kill()
                self.workers.pop(i, None)
            where = f" on {key}" if len(self.slots) > 1 else ""
            self.record(p, status, payload, started, where, started_at)
        worker = self.workers.pop(i, None)
        if worker is not None:
            worker.stop()

    def stop(self) -> None:
        """Interrupted: no slot takes another point, and every worker is stopped now."""
        self.stopping.set()
        for worker in list(self.workers.values()):
            worker.kill()
        self.workers.clear()


def run_sweep(stage: StageRun, points: list[Point], folder: Path,
              bandwidth: dict | Callable[[], dict], timeout: float, retry_failed: bool,
              extra_code: list[Path], roofline_of: Callable[[dict], float | None],
              slots: list[Slot] | None = None, *, measure: Measure) -> None:
    """Run every point not yet finished in this sweep; append one record per point. `bandwidth` may
    be the function that measures it: called once the sweep is claimed and has points to run (a
    refused second start, or a resumed sweep with nothing left, measures nothing). `slots`: the
    GPUs to run on at once (one point per GPU at a time, each GPU's workers on its own cores);
    default: one point at a time on the device each point names. `measure` runs a point in its
    worker (a module-level function: bench.registry.run)."""
    slots = slots or [Slot()]
    placement = ",".join(f"gpu-{s.gpu}" for s in slots if s.gpu is not None)
    for key in sorted({s.key(p.device()) for s in slots for p in points if not p.skip}):
        try:  # a lock file this user cannot open fails the sweep now, not at its first point
            os.close(open_lock(lock_path(key)))
        except OSError as e:
            raise StorageError(f"the {key} lock {lock_path(key)} cannot be opened "
                               f"({e.strerror or e}); nothing was run. Set INFERLAB_LOCK_DIR to a "
                               "folder every user of this host can write") from None
    digest = code_digest(extra_code)
    if placement:
        digest = short_digest([digest, placement])
    state = SweepState(stage.path.parent, stage, points, digest)
    done = state.start(retry_failed)
    # after the stage's own work and MLflow logging, not before
    stage.when_finished(state.complete)

    todo = [p for p in points if point_id(stage, p) not in done]
    if callable(bandwidth):
        bandwidth = bandwidth() if any(not p.skip for p in todo) else {}
    to_run = [p for p in todo if not p.skip]
    sweep = _Sweep(stage, to_run, len(todo), folder, bandwidth, timeout, roofline_of, slots, measure)
    at_once = f" on {placement} at once" if len(slots) > 1 else ""
    log.info("sweep %s: %d points to run (%d finished earlier), in %d worker group(s)%s",
             stage.sweep_id, len(todo), len(done), len({p.group for p in to_run}), at_once)
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
    """Every slot measures in a thread of its own (one slot: in this thread); an error in one stops
    the sweep once the others are done with their points (the manifest stays 'running': a rerun
    resumes)."""
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
    """Read the model files of the points into the page cache once, before GPUs load them side by
    side: each file comes from the disk once per host, and the loads that follow read it from
    memory."""
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


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _record(stage: StageRun, p: Point, status: str, payload: dict, bandwidth: dict,
            roofline_of: Callable[[dict], float | None], started: str) -> None:
    metrics = payload.get("metrics", {})
    if status == "ok" and "weight_bytes" in metrics and "bandwidth_gbps" in bandwidth:
        rate = roofline_of(metrics)
        metrics["roofline"] = roofline(bandwidth["bandwidth_gbps"], metrics["weight_bytes"], rate)
    if "traceback" in payload:
        metrics["traceback"] = payload["traceback"]
    if bandwidth:
        metrics["bandwidth"] = bandwidth
    stage.record(p.name, p.identity(), status=status, reason=payload.get("reason"),
                 metrics=metrics, samples=payload.get("samples", {}),
                 artifacts=payload.get("artifacts", {}), started=started)
