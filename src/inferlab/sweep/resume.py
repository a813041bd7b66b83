"""Resume: a sweep writes a manifest (its id and a digest of the code) before the first point. If
the stage is interrupted at any moment until it has finished (its points measured, its records
logged to MLflow, its aggregates written), rerunning the same sweep (same points, same code, same
hardware) continues it: the points that have a record of it in the records file are not measured
again. A finished sweep is never resumed: when DVC reruns the stage (its params or code changed),
every point is measured anew.

A Hydra multirun (`-m`) is one sweep of many jobs: its manifest is keyed by the multirun's own
overrides, every job adds itself when it has finished, and the multirun is finished when all its
jobs are.

Only one process runs a sweep (or a job of a multirun) at a time: it holds an exclusive flock on a
lock file for its whole life, and the file names it (pid, host, boot, start). A second start of the
same sweep refuses at once, naming the live one, and measures nothing; a holder that died released
its lock with its process."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import inferlab
from inferlab import records as rec
from inferlab.hostlock import boot_id
from inferlab.stage import CannotStart, StageRun, Stopped, multirun
from inferlab.sweep.points import Point

log = logging.getLogger(__name__)


def code_digest(extra: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(inferlab.__file__).parent.rglob("*.py")) + sorted(extra):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def point_id(stage: StageRun, p: Point) -> str:
    return rec.point_id(stage.stage, {"model": stage.model["name"], **p.identity()})


def short_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


class SweepBusy(CannotStart):
    """The same sweep is being run by another process right now."""


def _take(path: Path, wait: bool) -> int | None:
    """An exclusive flock on `path` (created if missing); its descriptor, or None when another
    process holds it and `wait` is false. A holder removes the file when it is done: a lock taken
    on a file that is no longer the one at `path` is dropped and taken again on the new one."""
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
    # while still holding it: whoever waits on the old file takes the new one
    path.unlink(missing_ok=True)
    os.close(fd)


class SweepState:
    """The manifest of one sweep (its id; for a multirun, its jobs done) and this process's claim
    on running it.

    Files beside the records: `.sweep-<key>.json` (the manifest), `.sweep-<key>.lock` (held while
    the manifest is read and changed: jobs of a multirun may start together) and
    `.sweep-<key>-<job>.lock` (held by the process that runs these points, for its whole life).
    <key> names the sweep: a digest of the code, the hardware and its points (a multirun: its
    overrides); <job> names this run's points."""

    def __init__(self, folder: Path, stage: StageRun, points: list[Point], digest: str):
        self.ids = sorted(point_id(stage, p) for p in points)
        self.stage = stage
        hw = stage.env["hardware"]["id"]
        self.multirun = multirun()
        if self.multirun is None:
            key = short_digest([digest, hw, self.ids])
        elif self.multirun.jobs:
            overrides = sorted(self.multirun.overrides)
            key = short_digest([digest, hw, stage.stage, "multirun", overrides])
        else:  # jobs unknown: this multirun only, not resumed by a rerun
            key = short_digest([digest, hw, stage.stage, self.multirun.name, self.ids])
        self.job = short_digest(self.ids)
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
        """Claim these points (SweepBusy if a live process runs them), join or resume the sweep
        they belong to, and return the ids of the points that already have a finished record of it.
        """
        fd = _take(self.live, wait=False)
        if fd is None:
            raise SweepBusy(self._busy_message())
        self._live_fd = fd
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(),
              "started": rec.now(), "sweep": self.stage.stage}
        os.write(fd, json.dumps(me).encode())
        self.stage.on_close(self.close)
        with self._manifest() as data:
            if data is None or data.get("status") != "running":
                data = {"sweep_id": self.stage.sweep_id, "status": "running", "points": [],
                        "jobs_done": []}
            data["points"] = sorted(set(data.get("points", [])) | set(self.ids))
            if self.multirun is not None:
                data["jobs"] = self.multirun.jobs
            self._write(data)
        self.sweep_id = data["sweep_id"]
        # a new sweep (or a job of the multirun that started it)
        if self.sweep_id == self.stage.sweep_id:
            return set()
        finished = ("ok", "skipped") if retry_failed else ("ok", "skipped", "failed")
        # others: other jobs' points
        mine, others = set(self.ids), set(data["points"]) - set(self.ids)
        earlier = [r for r in rec.read(self.stage.path)
                   if r.sweep_id == self.sweep_id and r.point_id not in others]
        done = {r.point_id for r in earlier if r.point_id in mine and r.status in finished}
        # every record this run made before (a stage's own records beside its points': evaluate's
        # scores)
        self.stage.resume(self.sweep_id,
                          [r for r in earlier if r.point_id in done or r.point_id not in mine])
        log.info("resuming interrupted sweep %s: %d of %d points already finished", self.sweep_id,
                 len(done), len(self.ids))
        return done

    def _busy_message(self) -> str:
        try:
            who = json.loads(self.live.read_text())
            holder = f"pid {who['pid']} on {who['host']}, started {who['started']}"
        except (OSError, ValueError, KeyError):
            holder = "another process"
        return (f"the same {self.stage.stage} sweep ({len(self.ids)} points, same code and "
                f"settings) is running now ({holder}); nothing was run. Wait for it to finish, or "
                "stop it and rerun this command to resume it")

    def complete(self) -> None:
        """The stage finished: every point of this run must have a record of the sweep in the file
        (else the sweep stays open, so a rerun measures what is missing). Then this job is done,
        and the sweep complete once all its jobs are."""
        present = {r.point_id for r in rec.read(self.stage.path) if r.sweep_id == self.sweep_id}
        missing = [i for i in self.ids if i not in present]
        if missing:
            raise Stopped(f"{len(missing)} of {len(self.ids)} points of sweep {self.sweep_id} have no "
                          f"readable record in {self.stage.path}; the sweep stays open: rerun to "
                          "measure them")
        with self._manifest() as data:
            data = data or {"sweep_id": self.sweep_id, "points": self.ids}
            jobs_done = sorted(set(data.get("jobs_done", [])) | {self.job})
            whole = self.multirun is None or len(jobs_done) >= (data.get("jobs") or 1)
            status = "complete" if whole else "running"
            self._write({**data, "jobs_done": jobs_done, "status": status})
            if whole:
                # held: a process waiting for it takes a new one
                self.mutex.unlink(missing_ok=True)

    def close(self) -> None:
        if self._live_fd is not None:
            _release(self._live_fd, self.live)
            self._live_fd = None
