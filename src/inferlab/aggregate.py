"""Aggregates from the records only: each stage's table rows, DVC metrics JSON and plot table.

The rows follow the stage's table (inferlab.fields); one writer writes them all.

Records of every machine are read (results/<stage>/<hardware>.jsonl), and the latest record of each
point per hardware and model is kept, so each hardware shows apart and a laptop's run never hides a
GPU's. Where several sweeps measured the same point on the same hardware kind, its spread across
them sits beside it: the median of the sweeps' figures, their range and count, and whether that
spread exceeds the spread within a run (a point that moves with the machine instance or the run,
usually because the host CPU bounds it).

The evaluate stage's table has a row per configuration: its latest generation record and that
generation's latest score record.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from statistics import median, pstdev
from typing import Any

from inferlab import fields as F
from inferlab import records as rec
from inferlab.config import StudyConfig, resolve

QUALITY_STAGE = "evaluate"
# metrics/<name>.json, metrics/plots/<name>.csv (default: the stage's)
METRICS_NAMES = {QUALITY_STAGE: "quality"}
NOT_MEANINGFUL = ("random weights: these scores and this perplexity measure nothing about "
                  "language quality; they show that the pipeline runs and how far a "
                  "configuration's outputs drift from its reference, no more")
# a point whose spread across sweeps exceeds SENSITIVITY times its spread within a run moves with
# the machine or the run (and the range across sweeps is at least MIN_RANGE of the median)
SENSITIVITY = 3.0
MIN_RANGE = 0.05


def hardware_of(r: rec.Record) -> str:
    return r.environment.get("hardware", {}).get("id", "?")


def point_key(r: rec.Record) -> tuple:
    """What a benchmark row stands for: one point on one hardware for one model."""
    return (r.environment.get("hardware", {}).get("id"), r.model.get("name"), r.point_id)


def latest_points(records: list[rec.Record]) -> list[rec.Record]:
    """The latest record of each point per hardware and model, in a stable order."""
    return sorted(rec.latest(records, point_key),
                  key=lambda r: (r.environment["hardware"]["id"], r.model["name"], r.name))


def stage_records(results_dir: Path, stage: str) -> list[rec.Record]:
    """Every record of a stage, from every machine's file."""
    return rec.read_all(sorted((results_dir / stage).glob("*.jsonl")))


def row(r: rec.Record) -> dict[str, Any]:
    """A benchmark record as its table row (stage_records_rows adds the sweep figures)."""
    out = {f.name: F.read(f, r) for f in F.BENCH if f.column and f.read is not None}
    out["reason"] = (r.reason or "")[:200] or None
    return out


def _median_of(r: rec.Record, figure: str) -> float | None:
    v = r.metrics.get(figure)
    median = v.get("median") if isinstance(v, dict) else None
    return median if isinstance(median, (int, float)) else None


def across_sweeps(records: list[rec.Record],
                  figure: str = "decode_tps") -> dict[tuple, dict[str, Any]]:
    """Per (hardware, model, point id): the point's figure in every sweep that measured it.

    The last record of each sweep and instance; their median, range and count, and whether they
    spread more than a run does."""
    by: dict[tuple, list[rec.Record]] = {}
    measured = [r for r in records if r.status == "ok" and _median_of(r, figure) is not None]
    for r in rec.latest(measured, lambda r: (*point_key(r), r.sweep_id, rec.instance_of(r))):
        by.setdefault(point_key(r), []).append(r)
    out = {}
    for key, group in by.items():
        values = [_median_of(r, figure) for r in group]
        mid = median(values)  # type: ignore[type-var]
        entry: dict[str, Any] = {"figure": figure, "sweeps": len(values), "median": F.value(mid),
                                 "min": F.value(min(values)),  # type: ignore[type-var]
                                 "max": F.value(max(values)),  # type: ignore[type-var]
                                 "instances": len({rec.instance_of(r) for r in group})}
        if len(values) > 1 and mid:
            within = [r.metrics[figure].get("stdev") / _median_of(r, figure)  # type: ignore
                      for r in group
                      if r.metrics[figure].get("stdev") is not None and _median_of(r, figure)]
            within_rel = median(within) if within else 0.0
            across_rel = pstdev(values) / mid  # type: ignore[arg-type,operator]
            range_rel = (max(values) - min(values)) / mid  # type: ignore[type-var,operator]
            entry.update(within_run=F.value(within_rel), across_sweeps=F.value(across_rel),
                         range=F.value(range_rel))
            if range_rel >= MIN_RANGE and across_rel > SENSITIVITY * within_rel:
                where = (f"{entry['instances']} machine instances" if entry["instances"] > 1
                         else "runs on one instance")
                entry["sensitive"] = (f"{figure} ranges {range_rel:.0%} across {len(values)} "
                                      f"sweeps on {where} (spread {across_rel:.1%} across "
                                      f"sweeps against {within_rel:.1%} within a run): it "
                                      "moves with the machine or the run, as host-bound points "
                                      "do; compare it only within one sweep")
        out[key] = entry
    return out


def stage_records_rows(
        results_dir: Path, stage: str, all_records: list[rec.Record] | None = None,
) -> list[tuple[rec.Record, dict[str, Any]]]:
    """The latest record of each point per hardware and model, with its row and its spread across
    sweeps. Points that share a name but differ in a setting (e.g. the workload) get the differing
    generated-token count appended to their name."""
    records = all_records if all_records is not None else stage_records(results_dir, stage)
    spread = across_sweeps(records)
    pairs = [(r, row(r)) for r in latest_points(records)]
    for r, out in pairs:
        s = spread.get((out["hardware"], out["model"], r.point_id), {})
        out["sweeps"] = s.get("sweeps", 0)
        for end in ("median", "min", "max"):
            out[f"decode_tps_sweeps_{end}"] = s.get(end)
        out["sensitive"] = s.get("sensitive")
    seen: dict[tuple, int] = {}
    for _, r in pairs:
        key = (r["hardware"], r["model"], r["name"])
        seen[key] = seen.get(key, 0) + 1
    for _, r in pairs:
        if seen[(r["hardware"], r["model"], r["name"])] > 1:
            r["name"] = f"{r['name']}{workload_suffix(r)}"
    return pairs


def workload_suffix(r: dict[str, Any]) -> str:
    """What tells apart two points of one name: their generated-token count, e.g. -n64."""
    return f"-n{'' if r.get('new_tokens') is None else r['new_tokens']}"


def stage_rows(results_dir: Path, stage: str) -> list[dict[str, Any]]:
    """One row per point (its latest record) per hardware and model; evaluate: per config."""
    if stage == QUALITY_STAGE:
        return quality_rows(results_dir)
    return [r for _, r in stage_records_rows(results_dir, stage)]


def quality_rows(results: Path) -> list[dict[str, Any]]:
    """One row per configuration (hardware of generation, model, config): the per-token figures of
    its latest generation record and the text scores of that generation, or why it has none."""
    recs = stage_records(results, QUALITY_STAGE)
    scored = [r for r in recs if r.point.get("scenario") == "scores"]
    scores = {r.point.get("generation_record"): r
              for r in rec.latest([r for r in scored if r.status == "ok"],
                                  lambda r: r.point.get("generation_record"))}
    generations = rec.latest([r for r in recs if r.point.get("scenario") != "scores"],
                             lambda r: (hardware_of(r), r.model.get("name"), r.name))
    rows = []
    def order(r: rec.Record) -> tuple:
        return tuple(map(str, (hardware_of(r), r.model.get("name"), r.name)))

    for g in sorted(generations, key=order):
        sc = scores.get(g.record_id)
        t = g.metrics.get("tokens") or {}
        vs = t.get(F.VS_REFERENCE) or {}
        source = {"environment": g.environment, "model": g.model, "name": g.name, "point": g.point,
                  "sweep_id": g.sweep_id, "metrics": g.metrics, "score": sc}
        if g.status != "ok":  # no figures from a generation that did not run
            source["metrics"] = {k: v for k, v in g.metrics.items() if k != "tokens"}
        out = {f.name: F.read(f, source) for f in F.QUALITY}
        # a reference agrees with itself by construction
        if g.status == "ok" and t.get("is_reference"):
            out.update({f.name: f.itself for f in F.QUALITY if f.itself is not None})
        drift_missing = sc.metrics.get("drift_missing") if sc else None
        reason = g.reason or vs.get("missing") or drift_missing or ""
        out.update(meaningful=g.model.get("weights") == "real",
                   status=(g.status if g.status != "ok"
                           else "ok" if sc or g.point.get("loop") else "not scored"),
                   reference="itself" if t.get("is_reference") else vs.get("reference"),
                   reason=reason[:200] or None, model_note=rec.model_note(g.model))
        rows.append(out)
    return rows


def bench_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A benchmark stage's DVC metrics: each point's summary figures, per hardware and model."""
    keep = [f.name for f in F.BENCH if f.summary]
    summary: dict[str, Any] = {}
    for r in rows:
        hw = summary.setdefault(r["hardware"],
                                {"bandwidth_gbps": r["bandwidth_gbps"], "models": {}})
        model = hw["models"].setdefault(r["model"], {"weights": r["weights"], "points": {}})
        point = model["points"][r["name"]] = {k: r[k] for k in keep if r[k] is not None}
        if r["sweeps"] > 1:  # the same point in several sweeps: the spread across them
            point["decode_tps_across_sweeps"] = {
                "sweeps": r["sweeps"], "median": r["decode_tps_sweeps_median"],
                "min": r["decode_tps_sweeps_min"], "max": r["decode_tps_sweeps_max"],
                **({"sensitive": r["sensitive"]} if r["sensitive"] else {})}
        if r["status"] != "ok":
            point["reason"] = r["reason"]
    return summary


def quality_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluate stage's DVC metrics: each configuration's figures, per hardware and model."""
    keep = [f.name for f in F.QUALITY if f.summary]
    summary: dict[str, Any] = {}
    for r in rows:
        model = summary.setdefault(r["hardware"], {}).setdefault(r["model"], {
            "weights": r["weights"], "meaningful": r["meaningful"], "configs": {}})
        if not r["meaningful"]:
            model["note"] = NOT_MEANINGFUL
        model["configs"][r["config"]] = {k: r[k] for k in keep if r[k] is not None} | {
            "status": r["status"], "reference": r["reference"]}
    return summary


def aggregate_files(cfg: StudyConfig, stage: str) -> tuple[Path, Path]:
    """metrics/<name>.json and metrics/plots/<name>.csv: what write_aggregates replaces."""
    metrics_dir, name = resolve(cfg.paths.metrics), METRICS_NAMES.get(stage, stage)
    return metrics_dir / f"{name}.json", metrics_dir / "plots" / f"{name}.csv"


def write_aggregates(cfg: StudyConfig, stage: str) -> dict[str, Any]:
    """metrics/<name>.json and metrics/plots/<name>.csv from the stage's records (the one writer of
    every stage's aggregates); returns the JSON's content."""
    rows = stage_rows(resolve(cfg.paths.results), stage)
    if stage == QUALITY_STAGE:
        summary, columns = quality_summary(rows), list(F.QUALITY_COLUMNS)
    else:
        summary, columns = bench_summary(rows), list(F.COLUMNS) if rows else []
    json_path, csv_path = aggregate_files(cfg, stage)
    rec.write_json(json_path, summary)
    buf = io.StringIO()
    if columns:
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    rec.write_atomic(csv_path, buf.getvalue())
    return summary


def markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = F.MARKDOWN_COLUMNS) -> str:
    """The same rows as the CSV and the JSON, as markdown tables per hardware and model."""
    out = []
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["hardware"], r["model"], r["weights"]), []).append(r)
    for (hw, model, weights), rs in groups.items():
        cols = [c for c in columns if any(r.get(c) not in ("", None) for r in rs)]
        out.append(f"### {model} ({weights} weights) on {hw}\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        out.extend("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |"
                   for r in rs)
        out.append("")
    return "\n".join(out)
