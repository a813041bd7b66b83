"""Did a parallel sweep change the figures? The same point measured while other GPUs of the host were measuring
(records with device_lock.others_busy) against the same point measured alone, from the records only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferlab import records as rec

FIGURES = ("decode_tps", "total_tps")


def _median(r: rec.Record, key: str) -> float | None:
    v = r.metrics.get(key)
    return v.get("median") if isinstance(v, dict) else None


def compare(results: Path, stage: str, tolerance: float = 0.05) -> list[dict[str, Any]]:
    """One row per point measured both alone and beside another GPU: the latest of each and their ratio."""
    alone: dict[tuple, rec.Record] = {}
    beside: dict[tuple, rec.Record] = {}
    for r in rec.read_all(sorted((results / stage).glob("*.jsonl"))):
        lock = r.metrics.get("device_lock")
        if r.status != "ok" or not isinstance(lock, dict) or "others_busy" not in lock:
            continue
        key = (r.environment.get("hardware", {}).get("id"), r.model.get("name"), r.point_id)
        side = beside if lock["others_busy"] else alone
        if key not in side or r.timestamp >= side[key].timestamp:
            side[key] = r
    rows = []
    for key in sorted(set(alone) & set(beside), key=str):
        a, b = alone[key], beside[key]
        row: dict[str, Any] = {"hardware": key[0], "model": key[1], "name": b.name,
                               "gpu": b.metrics["device_lock"]["device"],
                               "beside": ",".join(b.metrics["device_lock"]["others_busy"])}
        ok = True
        for f in FIGURES:
            x, y = _median(a, f), _median(b, f)
            if x is None or y is None or not x:
                continue
            row[f"{f}_alone"], row[f"{f}_parallel"], row[f"{f}_ratio"] = x, y, y / x
            ok = ok and abs(y / x - 1) <= tolerance
        row["within_tolerance"] = ok
        rows.append(row)
    return rows
