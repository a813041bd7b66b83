"""Aggregates derived from the records only: the DVC metrics JSON and the plot table of a benchmark stage.

Records of every machine are read (results/<stage>/<hardware>.jsonl), and the latest record of each point
per hardware and model is kept, so each hardware shows apart and a laptop's run never hides a GPU's. Where
several sweeps measured the same point on the same hardware kind, its spread across them sits beside it: the
median of the sweeps' figures, their range and count, and whether that spread exceeds the spread within a run
(a point that moves with the machine instance or the run, usually because the host CPU bounds it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from statistics import median, pstdev
from typing import Any

from inferlab import records as rec
from inferlab.config import StudyConfig, resolve

# plot-table columns: settings first, then figures (median unless named otherwise)
SETTING_COLUMNS = ("runtime", "scenario", "quant", "precision", "batch_size", "n_threads", "n_batch", "flash_attn",
                   "kv_type", "kv_cache", "attn", "compile", "api", "mode", "prompt_tokens", "new_tokens",
                   "concurrency", "max_tokens", "decode", "compile_mode", "inductor", "fuse_qkv", "fuse_block", "gemv",
                   "n_gpu_layers", "lookup_tokens", "task", "rate", "rate_fraction", "burstiness")
FIGURES = ("decode_tps", "total_tps", "ttft_ms", "tpot_ms", "e2e_ms", "prefill_tps", "llama_decode_tps",
           "harness_overhead_ms")


def latest(records: list[rec.Record]) -> list[rec.Record]:
    best: dict[tuple, rec.Record] = {}
    for r in records:
        key = (r.environment.get("hardware", {}).get("id"), r.model.get("name"), r.point_id)
        if key not in best or r.timestamp >= best[key].timestamp:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.environment["hardware"]["id"], r.model["name"], r.name))


def row(r: rec.Record) -> dict[str, Any]:
    m = r.metrics
    out: dict[str, Any] = {"hardware": r.environment["hardware"]["id"], "model": r.model["name"],
                           "weights": r.model.get("weights"), "name": r.name, "status": r.status,
                           "sweep_id": r.sweep_id, "instance": rec.instance_of(r), "timestamp": r.timestamp,
                           "point_id": r.point_id}
    out.update({k: r.point.get(k, "") for k in SETTING_COLUMNS})
    for f in FIGURES:
        out[f] = _round(m.get(f, {}).get("median")) if isinstance(m.get(f), dict) else ""
    itl = m.get("itl_ms", {})
    out["itl_p50_ms"], out["itl_p90_ms"], out["itl_p99_ms"] = (_round(itl.get(k)) for k in ("median", "p90", "p99"))
    out["decode_tps_stdev"] = _round(m.get("decode_tps", {}).get("stdev")) if "decode_tps" in m else ""
    out["cold_ttft_ms"] = _round(m.get("cold", {}).get("ttft_ms"))
    for k in ("peak_rss_mib", "peak_allocated_gib", "peak_reserved_gib", "load_s", "weight_bytes", "cache_hits",
              "first_ttft_ms", "harness_overhead_fraction", "request_throughput", "token_throughput", "errors",
              "offered_rate", "goodput", "slo_attainment", "meets_slo"):
        out[k] = _round(m.get(k))
    roof = m.get("roofline", {})
    out["roofline_tps"] = _round(roof.get("roofline_tps"))
    out["roofline_fraction"] = _round(roof.get("roofline_fraction"))
    out["bandwidth_gbps"] = _round(m.get("bandwidth", {}).get("bandwidth_gbps"))
    out["reason"] = (r.reason or "")[:200]
    return out


def _round(v: Any) -> Any:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "" if v != v else round(v, 4)
    return v


SENSITIVITY = 3.0  # a point whose spread across sweeps exceeds this many times its spread within a run moves with
MIN_RANGE = 0.05  # the machine or the run (and the range across sweeps is at least this fraction of the median)


def _median_of(r: rec.Record, figure: str) -> float | None:
    v = r.metrics.get(figure)
    return v.get("median") if isinstance(v, dict) and isinstance(v.get("median"), (int, float)) else None


def across_sweeps(records: list[rec.Record], figure: str = "decode_tps") -> dict[tuple, dict[str, Any]]:
    """Per (hardware, model, point id): the point's figure in every sweep that measured it (the last record of
    each sweep and instance), their median, range and count, and whether they spread more than a run does."""
    by: dict[tuple, dict[tuple, rec.Record]] = {}
    for r in records:
        if r.status != "ok" or _median_of(r, figure) is None:
            continue
        key = (r.environment["hardware"]["id"], r.model["name"], r.point_id)
        group = (r.sweep_id, rec.instance_of(r))
        if group not in by.setdefault(key, {}) or r.timestamp >= by[key][group].timestamp:
            by[key][group] = r
    out = {}
    for key, groups in by.items():
        values = [_median_of(r, figure) for r in groups.values()]
        mid = median(values)  # type: ignore[type-var]
        entry: dict[str, Any] = {"figure": figure, "sweeps": len(values), "median": _round(mid),
                                 "min": _round(min(values)), "max": _round(max(values)),  # type: ignore[type-var]
                                 "instances": len({g[1] for g in groups})}
        if len(values) > 1 and mid:
            within = [r.metrics[figure].get("stdev") / _median_of(r, figure)  # type: ignore[operator]
                      for r in groups.values() if r.metrics[figure].get("stdev") is not None and _median_of(r, figure)]
            within_rel = median(within) if within else 0.0
            across_rel = pstdev(values) / mid  # type: ignore[arg-type,operator]
            range_rel = (max(values) - min(values)) / mid  # type: ignore[type-var,operator]
            entry.update(within_run=_round(within_rel), across_sweeps=_round(across_rel), range=_round(range_rel))
            if range_rel >= MIN_RANGE and across_rel > SENSITIVITY * within_rel:
                where = (f"{entry['instances']} machine instances" if entry["instances"] > 1
                         else "runs on one instance")
                entry["sensitive"] = (f"{figure} ranges {range_rel:.0%} across {len(values)} sweeps on {where} "
                                      f"(spread {across_rel:.1%} across sweeps against {within_rel:.1%} within a "
                                      "run): it moves with the machine or the run, as host-bound points do; compare "
                                      "it only within one sweep")
        out[key] = entry
    return out


def stage_records_rows(results_dir: Path, stage: str,
                       all_records: list[rec.Record] | None = None) -> list[tuple[rec.Record, dict[str, Any]]]:
    """The latest record of each point per hardware and model, with its row and its spread across sweeps. Points
    that share a name but differ in a setting (e.g. the workload) get the differing generated-token count appended
    to their name."""
    records = all_records if all_records is not None else stage_records(results_dir, stage)
    spread = across_sweeps(records)
    pairs = [(r, row(r)) for r in latest(records)]
    for r, out in pairs:
        s = spread.get((out["hardware"], out["model"], r.point_id), {})
        out["sweeps"] = s.get("sweeps", 0)
        out["decode_tps_sweeps_median"], out["decode_tps_sweeps_min"], out["decode_tps_sweeps_max"] = (
            s.get("median", ""), s.get("min", ""), s.get("max", ""))
        out["sensitive"] = s.get("sensitive", "")
    seen: dict[tuple, int] = {}
    for _, r in pairs:
        key = (r["hardware"], r["model"], r["name"])
        seen[key] = seen.get(key, 0) + 1
    for _, r in pairs:
        if seen[(r["hardware"], r["model"], r["name"])] > 1:
            r["name"] = f"{r['name']}-n{r['new_tokens']}"
    return pairs


def stage_records(results_dir: Path, stage: str) -> list[rec.Record]:
    """Every record of a stage, from every machine's file."""
    return rec.read_all(sorted((results_dir / stage).glob("*.jsonl")))


def stage_rows(results_dir: Path, stage: str) -> list[dict[str, Any]]:
    """One row per point (its latest record) per hardware and model."""
    return [r for _, r in stage_records_rows(results_dir, stage)]


MARKDOWN_COLUMNS = ("name", "status", "batch_size", "decode_tps", "total_tps", "ttft_ms", "itl_p50_ms", "itl_p90_ms",
                    "peak_rss_mib", "peak_allocated_gib", "roofline_fraction", "reason")


def markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = MARKDOWN_COLUMNS) -> str:
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
        out.extend("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rs)
        out.append("")
    return "\n".join(out)


def write_aggregates(cfg: StudyConfig, stage: str) -> dict[str, Any]:
    rows = stage_rows(resolve(cfg.paths.results), stage)
    summary: dict[str, Any] = {}
    for r in rows:
        hw = summary.setdefault(r["hardware"], {"bandwidth_gbps": r["bandwidth_gbps"], "models": {}})
        model = hw["models"].setdefault(r["model"], {"weights": r["weights"], "points": {}})
        keep = ("status", "decode_tps", "total_tps", "ttft_ms", "itl_p50_ms", "itl_p90_ms", "peak_rss_mib",
                "peak_allocated_gib", "roofline_fraction", "cold_ttft_ms", "cache_hits", "request_throughput",
                "token_throughput", "errors", "e2e_ms", "offered_rate", "goodput", "slo_attainment", "meets_slo",
                "sweep_id", "instance")
        model["points"][r["name"]] = {k: r[k] for k in keep if r[k] != ""}
        if r["sweeps"] > 1:  # the same point in several sweeps: the spread across them
            model["points"][r["name"]]["decode_tps_across_sweeps"] = {
                "sweeps": r["sweeps"], "median": r["decode_tps_sweeps_median"], "min": r["decode_tps_sweeps_min"],
                "max": r["decode_tps_sweeps_max"], **({"sensitive": r["sensitive"]} if r["sensitive"] else {})}
        if r["status"] != "ok":
            model["points"][r["name"]]["reason"] = r["reason"]
    metrics_dir = resolve(cfg.paths.metrics)
    rec.write_json(metrics_dir / f"{stage}.json", summary)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rec.write_atomic(metrics_dir / "plots" / f"{stage}.csv", buf.getvalue())
    return summary

