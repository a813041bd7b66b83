"""Did a parallel sweep change the figures? A point measured beside other GPUs against alone.

A point moved when a figure's parallel/alone ratio is off 1 by more than the tolerance (5 %) or,
where larger, its own run-to-run spread in either run (a point that varies by 8 % between
repetitions cannot be held to 5 %).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from inferlab import fields as F
from inferlab import records as rec
from inferlab.bench.stats import percentile

FIGURES = {name: F.field(name).title for name in ("decode_tps", "total_tps")}  # -> column title


def _median(r: rec.Record, key: str) -> float | None:
    v = r.metrics.get(key)
    m = v.get("median") if isinstance(v, dict) else None
    return m if isinstance(m, (int, float)) and m == m else None


def spread(r: rec.Record, key: str) -> float | None:
    """(max - min) / median of a figure's raw samples in one record; None below two samples."""
    xs = [float(x) for x in r.samples.get(key) or [] if isinstance(x, (int, float)) and x == x]
    med = percentile(xs, 50) if len(xs) >= 2 else None
    return (max(xs) - min(xs)) / med if med else None


def _lock(r: rec.Record) -> dict | None:
    lock = r.metrics.get("device_lock")
    return lock if isinstance(lock, dict) and "others_busy" in lock else None


def _parallel(r: rec.Record) -> bool:
    """Measured beside another GPU, or in a sweep on several GPUs at once.

    Its last points may have run with the other GPUs done: they are that run's figures still."""
    at_once = (r.metrics.get("placement") or {}).get("gpus_at_once") or 1
    return bool(_lock(r)["others_busy"]) or at_once > 1


def _records(results: Path, stage: str) -> list[rec.Record]:
    return [r for r in rec.read_all(sorted((results / stage).glob("*.jsonl"))) if _lock(r)]


def compare(results: Path, stage: str, tolerance: float = 0.05) -> list[dict[str, Any]]:
    """One row per point measured both alone and beside another GPU (the latest of each).

    Each figure's medians, spreads and ratio, the deviation allowed, and which figures moved."""
    alone: dict[tuple, rec.Record] = {}
    beside: dict[tuple, rec.Record] = {}
    for r in _records(results, stage):
        if r.status != "ok":
            continue
        key = (r.environment.get("hardware", {}).get("id"), r.model.get("name"), r.point_id)
        side = beside if _parallel(r) else alone
        if key not in side or r.timestamp >= side[key].timestamp:
            side[key] = r
    rows = []
    for key in sorted(set(alone) & set(beside), key=lambda k: (str(k[:2]), beside[k].name)):
        a, b = alone[key], beside[key]
        row: dict[str, Any] = {
            "hardware": key[0], "model": key[1], "name": b.name, "gpu_alone": _lock(a)["device"],
            "gpu": _lock(b)["device"], "beside": ",".join(_lock(b)["others_busy"]) or "-",
            "sweep_alone": a.sweep_id, "sweep_parallel": b.sweep_id, "moved": [],
        }
        for f in FIGURES:
            x, y = _median(a, f), _median(b, f)
            if x is None or y is None or not x:
                continue
            sa, sb = spread(a, f), spread(b, f)
            allowed = max(tolerance, sa or 0.0, sb or 0.0)
            row[f] = {"alone": x, "alone_spread": sa, "parallel": y, "parallel_spread": sb,
                      "ratio": y / x, "allowed": allowed}
            if abs(y / x - 1) > allowed:
                row["moved"].append(f)
        row["within_tolerance"] = not row["moved"]
        rows.append(row)
    return rows


def _time(ts: str) -> float:
    return dt.datetime.fromisoformat(ts).timestamp()


def sweep_time(records: list[rec.Record], sweep_id: str) -> dict[str, Any]:
    """How long a sweep kept the host's GPUs busy, its points and the GPUs it ran on.

    The union of its points' measuring intervals: a pause before a resumption does not count."""
    spans, gpus, points, timed = [], set(), set(), True
    for r in records:
        if r.sweep_id != sweep_id:
            continue
        lock = _lock(r)
        timed = timed and lock.get("held_s") is not None
        # records' own timestamps are to the second
        end = float(lock.get("released_at") or _time(r.timestamp))
        spans.append((end - float(lock.get("held_s") or 0.0), end))
        gpus.add(lock["device"])
        points.add(r.point_id)
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return {"sweep_id": sweep_id, "points": points, "gpus": sorted(gpus), "seconds": busy,
            "timed": timed}


def runs(results: Path, stage: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The parallel and alone sweeps behind the rows, and the parallel one's time over the alone.

    The ratio only where there is one of each over the same points."""
    records = _records(results, stage)
    out: dict[str, Any] = {}
    for side in ("parallel", "alone"):
        out[side] = [sweep_time(records, s) for s in sorted({r[f"sweep_{side}"] for r in rows})]
    p, a = out["parallel"], out["alone"]
    same = (len(p) == 1 and len(a) == 1 and p[0]["sweep_id"] != a[0]["sweep_id"]
            and p[0]["points"] == a[0]["points"])
    timed = same and p[0]["timed"] and a[0]["timed"] and a[0]["seconds"] > 0
    out["time_ratio"] = p[0]["seconds"] / a[0]["seconds"] if timed else None
    return out
