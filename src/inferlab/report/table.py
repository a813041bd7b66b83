"""The report's inputs, from the records only: per hardware and model, the benchmark rows joined
with the quality figures of the same configuration on the same hardware.

Figures are compared only where they were measured together: in one sweep on one machine
instance (a group). A section keeps every record's row (`history`); its ranked group, the group
holding the most configurations, supplies the candidates that the frontier and the
recommendation rank; `view(group)` gives the same interface over one group's rows, so each
comparison can be made within a group."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from inferlab import aggregate as agg
from inferlab import records as rec
from inferlab.config import loop_path
from inferlab.fields import QUALITY_FIGURES

log = logging.getLogger(__name__)

BENCH_STAGES = ("bench_gpu", "bench_cpu")
DEVICE_OF_STAGE = {"bench_gpu": "cuda", "bench_cpu": "cpu"}
QUALITY_KEYS = QUALITY_FIGURES  # joined from the evaluate stage onto each benchmark point
SPREAD_KEYS = ("sweeps", "decode_tps_sweeps_median", "decode_tps_sweeps_min",
               "decode_tps_sweeps_max", "sensitive")


def fmt(x: float) -> str:
    """Three significant digits below 100, whole numbers with commas above."""
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


@dataclass
class Section:
    """Everything measured for one model on one machine."""

    hardware: str
    model: str
    weights: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # benchmark rows, any status
    quality: list[dict[str, Any]] = field(default_factory=list)  # of configurations made here
    quality_metric: str = "kl_mean"
    model_note: str = ""  # what the records say its weights are (e.g. dequantized from a file)
    history: list[dict[str, Any]] = field(default_factory=list)  # a row per record, every sweep
    group: tuple | None = None  # on a view: the (sweep id, instance) its rows were measured in
    files: dict[str, str] = field(default_factory=dict)  # GGUF type -> what the file really holds

    @property
    def title(self) -> str:
        return f"{self.model} on {self.hardware}"

    @property
    def slug(self) -> str:
        return f"{self.hardware}--{self.model}"

    def ok(self, scenario: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows
                if r["status"] == "ok" and (scenario is None or r["scenario"] == scenario)]

    def not_ok(self) -> list[dict[str, Any]]:
        return ([r for r in self.rows if r["status"] != "ok"]
                + [q for q in self.quality if q["status"] != "ok"])

    @cached_property
    def candidates(self) -> list[dict[str, Any]]:
        """Latency points that ran, one per configuration, all from one sweep on one instance (the
        ranked group, on a full section): where a configuration ran with several generation
        lengths, the longest (steadier decode figures) stands for it."""
        if self.history and self.group is None:
            return self.view(self.ranked_group).candidates if self.ranked_group else []
        best: dict[tuple, dict[str, Any]] = {}
        for r in self.ok("latency"):
            if r.get("total_tps") is None:
                continue
            key = (r["stage"], r["config"])
            if key not in best or (r["new_tokens"] or 0) > (best[key]["new_tokens"] or 0):
                best[key] = r
        return sorted(best.values(), key=sort_key)

    @cached_property
    def scored(self) -> list[dict[str, Any]]:
        return [q for q in self.quality if q["status"] == "ok"]

    def view(self, group: tuple) -> Section:
        """The section as measured in one group: the latest row of each point within it."""
        mine = [r for r in self.history if (r["sweep_id"], r["instance"]) == group]
        latest = rec.latest(mine, lambda r: r["point_id"], when=lambda r: r["timestamp"])
        return Section(self.hardware, self.model, self.weights, latest, self.quality,
                       self.quality_metric, self.model_note, group=group)

    def merged(self) -> Section:
        """The latest row of every point, whichever group measured it (never for comparing)."""
        return Section(self.hardware, self.model, self.weights, self.rows, self.quality,
                       self.quality_metric, self.model_note, group=("all", "all"))

    @cached_property
    def groups(self) -> list[tuple]:
        """Every (sweep id, instance) that measured here: the ranked group, then newest first."""
        newest: dict[tuple, str] = {}
        for r in self.history:
            g = (r["sweep_id"], r["instance"])
            newest[g] = max(newest.get(g, ""), r["timestamp"])
        order = sorted(newest, key=lambda g: newest[g], reverse=True)
        if self.ranked_group in order:
            order.remove(self.ranked_group)
            order.insert(0, self.ranked_group)
        return order

    @cached_property
    def ranked_group(self) -> tuple | None:
        """The group whose configurations are ranked: the one holding the most latency points that
        ran (the newest among equals)."""
        count: dict[tuple, int] = {}
        newest: dict[tuple, str] = {}
        for r in self.history:
            if (r["status"] == "ok" and r["scenario"] == "latency"
                    and r.get("total_tps") is not None):
                g = (r["sweep_id"], r["instance"])
                count[g] = count.get(g, 0) + 1
                newest[g] = max(newest.get(g, ""), r["timestamp"])
        return max(count, key=lambda g: (count[g], newest[g])) if count else None

    @staticmethod
    def label(group: tuple | None) -> str:
        if not group:
            return "no sweep"
        sweep, instance = group
        return f"sweep `{sweep}` on instance `{instance[:8]}`"


def sort_key(r: dict[str, Any]) -> tuple:
    return (r["stage"], r["runtime"], str(r.get("precision") or r.get("quant")),
            r.get("batch_size") or 0,
            str(r.get("kv_cache")), str(r.get("compile")), r.get("n_threads") or 0, r["name"])


def _match(row: dict[str, Any], scored: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The quality configuration a benchmark point ran: same runtime and device, same precision
    (transformers) or quant (llama.cpp), same KV cache. generate()'s batch, threads and compile
    change speed, not what is computed; a decode loop's point takes the quality scored through
    its own step (`loop_quality`)."""
    for q in scored:
        if q["runtime"] != row["runtime"]:
            continue
        if row["runtime"] == "hf":
            ran = (q["device"], q["precision"], q["kv_cache"], q.get("loop"))
            if ran == (row["device"], row["precision"], row["kv_cache"], None):
                return q
        elif row["runtime"] == "llama_cpp":
            same_file = (q["quant"], q["kv_type"]) == (row["quant"], row["kv_type"])
            if same_file:
                return q
    return None


def loop_quality(row: dict[str, Any], scored: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The quality of a decode loop's point: scored through the same loop's step (same precision,
    same loop settings), never borrowed from a forward pass through other kernels."""
    loop = loop_path(row)
    return next((q for q in scored if q["runtime"] == "hf" and q["device"] == row["device"]
                 and q["precision"] == row["precision"] and q.get("loop") == loop), None)


def _enrich(row: dict[str, Any], record_metrics: dict[str, Any], stage: str) -> dict[str, Any]:
    row = dict(row)
    row["stage"] = stage
    row["device"] = DEVICE_OF_STAGE[stage]
    suffix = agg.workload_suffix(row)
    row["config"] = row["name"][: -len(suffix)] if row["name"].endswith(suffix) else row["name"]
    if row["device"] == "cuda" and row["runtime"] == "llama_cpp":  # outside torch: the driver's
        row["memory_gib"] = row.get("gpu_process_gib")
        row["memory_kind"] = "GPU used by the process"
    elif row["device"] == "cuda":
        row["n_threads"] = None  # the GPU sweep does not set threads
        row["memory_gib"], row["memory_kind"] = row.get("peak_allocated_gib"), "GPU allocated"
    else:
        rss = row.get("peak_rss_mib")
        row["memory_gib"] = None if rss is None else rss / 1024
        row["memory_kind"] = "process RSS"
    prompt = row.get("prompt_tokens")
    row["workload"] = f"{prompt}+{row['new_tokens']}" if prompt is not None else ""
    row["_metrics"] = record_metrics
    return row


def gguf_labels(results: Path) -> dict[str, dict[str, str]]:
    """Per model, per GGUF type: what the convert stage found the file to hold (its latest record
    on any machine: the file's contents do not depend on where it was made), e.g. 'q4_k_m (180
    of 211 matrices fell back: ...)'."""
    labelled = [r for r in agg.stage_records(results, "convert")
                if r.status == "ok" and r.metrics.get("label")]
    out: dict[str, dict[str, str]] = {}
    for r in rec.latest(labelled, lambda r: (r.model.get("name"), r.name)):
        out.setdefault(r.model.get("name"), {})[r.name] = r.metrics["label"]
    return out


def collect(results: Path, quality_metric: str = "kl_mean", models: list[str] | None = None
            ) -> list[Section]:
    """Sections per (hardware, model) from every record file under results/, in a stable order."""
    sections: dict[tuple[str, str], Section] = {}

    def section(hw: str, model: str, weights: str) -> Section:
        if (hw, model) not in sections:
            sections[(hw, model)] = Section(hw, model, weights or "",
                                            quality_metric=quality_metric)
        return sections[(hw, model)]

    for stage in BENCH_STAGES:
        records = agg.stage_records(results, stage)
        latest: dict[tuple, dict[str, Any]] = {}  # (hardware, model, point id) -> its latest row
        for record, row in agg.stage_records_rows(results, stage, records):
            s = section(row["hardware"], row["model"], row["weights"])
            s.rows.append(_enrich(row, record.metrics, stage))
            s.model_note = rec.model_note(record.model) or s.model_note
            latest[agg.point_key(record)] = row
        for record in records:
            row = agg.row(record)
            if (last := latest.get(agg.point_key(record))) is not None:
                row.update({k: last[k] for k in SPREAD_KEYS}, name=last["name"])
            section(row["hardware"], row["model"], row["weights"]).history.append(
                _enrich(row, record.metrics, stage))
    for q in agg.quality_rows(results):
        s = section(q["hardware"], q["model"], q["weights"])
        s.quality.append(q)
        s.model_note = q.get("model_note") or s.model_note
    files = gguf_labels(results)
    for s in sections.values():
        s.files = files.get(s.model, {})
    out = [s for s in sections.values() if not models or s.model in models]
    for s in out:
        scored = s.scored
        for r in s.rows + s.history:
            q = None
            if r["status"] == "ok":
                q = loop_quality(r, scored) if loop_path(r) else _match(r, scored)
            r["quality_config"] = q["config"] if q else ""
            for k in QUALITY_KEYS:
                r[k] = q.get(k) if q else None
            r["quality"] = r.get(quality_metric)
    # GPU machines first, the most recently measured first (older GPUs are history), then the
    # others by name (each sort keeps the order of the one before among equals)
    def gpu(s: Section) -> bool:
        return any(r["device"] == "cuda" and r["status"] == "ok" for r in s.rows)

    out.sort(key=lambda s: (s.hardware, s.model))
    out.sort(key=lambda s: max(r["timestamp"] or "" for r in s.rows) if gpu(s) else "",
             reverse=True)
    return sorted(out, key=lambda s: (not gpu(s), not s.rows))
