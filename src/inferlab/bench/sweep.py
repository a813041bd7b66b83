"""Running a sweep: points in worker processes, one record per point, progress with ETA, resume.

Resume: a sweep writes a manifest (its point ids and a digest of the code) before the first point. If it is
interrupted, rerunning the same sweep (same points, same code) finds the manifest still marked running and
runs only the points that have no record yet. A finished sweep is never resumed: when DVC reruns the stage
(its params or code changed), every point is measured anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import inferlab
from inferlab import records as rec
from inferlab.bench.lock import device_key, device_lock, others_busy
from inferlab.bench.memory import roofline
from inferlab.bench.worker import Worker
from inferlab.study import StageRun

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


class Manifest:
    def __init__(self, folder: Path, stage: StageRun, points: list[Point], digest: str):
        ids = sorted(_point_id(stage, p) for p in points)
        key = hashlib.sha256(json.dumps([digest, stage.env["hardware"]["id"], ids]).encode()).hexdigest()[:16]
        self.path = folder / f".sweep-{key}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else None
        self.ids = ids
        self.digest = digest

    def resumable(self) -> str | None:
        return self.data["sweep_id"] if self.data and self.data.get("status") == "running" else None

    def write(self, sweep_id: str, status: str) -> None:
        self.data = {"sweep_id": sweep_id, "status": status, "code_digest": self.digest, "points": self.ids,
                     "updated": rec.now()}
        rec.write_json(self.path, self.data)


def run_sweep(stage: StageRun, points: list[Point], folder: Path, bandwidth: dict, timeout: float,
              retry_failed: bool, extra_code: list[Path], roofline_of: Callable[[dict], float | None]) -> None:
    """Run every point not yet finished in this sweep; append one record per point."""
    manifest = Manifest(stage.path.parent, stage, points, code_digest(extra_code))
    resumed = manifest.resumable()
    done: set[str] = set()
    if resumed:
        stage.sweep_id = resumed
        finished = ("ok", "skipped") if retry_failed else ("ok", "skipped", "failed")
        earlier = [r for r in rec.read(stage.path) if r.sweep_id == resumed]
        done = {r.point_id for r in earlier if r.status in finished}
        stage.records.extend(r for r in earlier if r.point_id in done)  # logged to MLflow with the rest
        log.info("resuming interrupted sweep %s: %d of %d points already finished", resumed, len(done), len(points))
    manifest.write(stage.sweep_id, "running")

    todo = [p for p in points if _point_id(stage, p) not in done]
    groups: dict[tuple, list[Point]] = {}
    for p in todo:
        groups.setdefault(p.group, []).append(p)
    total, n_done, t0 = len(todo), 0, time.perf_counter()
    log.info("sweep %s: %d points to run (%d finished earlier), in %d worker group(s)", stage.sweep_id, total,
             len(done), len(groups))
    for pts in groups.values():
        worker: Worker | None = None
        for p in pts:
            started, started_at = time.perf_counter(), rec.now_ms()
            if p.skip:
                status, payload = "skipped", {"reason": p.skip}
            else:
                if worker is None:
                    worker = Worker(p.runtime, p.load)
                key = device_key(_device(p))
                with device_lock(key) as waited:  # one point measured per device at a time, across processes
                    beside = others_busy(key)  # other GPUs measuring at the same time (a parallel sweep)
                    status, payload = worker.run(p.settings, p.name, str(folder), timeout,
                                                 {**p.load, "sweep_id": stage.sweep_id})
                payload.setdefault("metrics", {})["device_lock"] = {"device": key, "waited_s": round(waited, 3),
                                                                    "others_busy": beside}
                if status == "failed":  # a clean process (and device) for what follows
                    worker.kill()
                    worker = None
            _record(stage, p, status, payload, bandwidth, roofline_of, started_at)
            n_done += 1
            elapsed = time.perf_counter() - t0
            eta = elapsed / n_done * (total - n_done)
            why = f" ({payload['reason'].splitlines()[0][:100]})" if status != "ok" and payload.get("reason") else ""
            log.info("[%d/%d] %s: %s%s in %.1f s (%d left, about %s to go)", n_done, total, p.name, status, why,
                     time.perf_counter() - started, total - n_done, _fmt(eta))
        if worker is not None:
            worker.stop()
    manifest.write(stage.sweep_id, "complete")


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
