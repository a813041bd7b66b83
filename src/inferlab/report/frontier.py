"""The Pareto frontier over speed, memory and quality, and the recommended configuration under
constraints.

A configuration is on the frontier when no other one is at least as fast, as small and as good
in quality (report.quality_metric: by default the mean KL divergence per token from the
runtime's full precision), and strictly better in one of them. Quality joins the axes only where
it was measured: a section with quality figures ranks the measured configurations on all three
axes; a section without any ranks speed and memory."""

from __future__ import annotations

from typing import Any

from inferlab import fields as F
from inferlab.config import QUALITY_METRICS, ConstraintsConfig, ReportConfig
from inferlab.report.table import fmt

# constraint -> (row figure, sense); sense +1: the figure must be at most the limit. Its label and
# unit are the figure's (inferlab.fields).
CONSTRAINTS = {
    "memory_gib": ("memory_gib", +1),
    "ttft_ms": ("ttft_ms", +1),
    "itl_p90_ms": ("itl_p90_ms", +1),
    "max_kl": ("kl_mean", +1),
    "min_top1": ("top1", -1),
}
# the KL limit has always been written in nats: recommendation.json (serve_bench reads it) keeps it
UNIT_WRITTEN = {"max_kl": "nats"}


def constraint(key: str) -> tuple[str, int, str, str]:
    """(row figure, sense, label, unit) of a constraint."""
    figure, sense = CONSTRAINTS[key]
    f = F.field(figure)
    return figure, sense, f.words, UNIT_WRITTEN.get(key, f.unit)


def axis_label(figure: str) -> str:
    """How the report names an objective or a quality axis (e.g. "total tokens/s")."""
    return F.field(figure).described


def axes(objective: str, with_quality: bool, quality_metric: str = "kl_mean"
         ) -> list[tuple[str, int]]:
    """(figure, +1 to maximise / -1 to minimise). The quality axis is the row's `quality` figure,
    the value of report.quality_metric."""
    out = [(objective, +1), ("memory_gib", -1)]
    return [*out, ("quality", QUALITY_METRICS[quality_metric])] if with_quality else out


def dominates(a: dict[str, Any], b: dict[str, Any], ax: list[tuple[str, int]]) -> bool:
    va = [a[k] * s for k, s in ax]
    vb = [b[k] * s for k, s in ax]
    return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))


def pareto(candidates: list[dict[str, Any]], ax: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The non-dominated candidates among those with every axis measured, fastest first."""
    usable = [c for c in candidates if all(c.get(k) is not None for k, _ in ax)]
    front = [c for c in usable if not any(dominates(o, c, ax) for o in usable if o is not c)]
    return sorted(front, key=lambda c: -c[ax[0][0]])


def frontier(candidates: list[dict[str, Any]], objective: str,
             quality_metric: str = "kl_mean") -> tuple[list[dict[str, Any]], bool]:
    """The frontier of one section and whether quality was one of its axes."""
    with_quality = any(c.get("quality") is not None for c in candidates)
    return pareto(candidates, axes(objective, with_quality, quality_metric)), with_quality


QUALITY_CONSTRAINTS = ("max_kl", "min_top1")  # not measurable where a model's weights are random
NO_QUALITY = "quality not measurable on random weights"


def _limits(constraints: ConstraintsConfig, quality: bool = True) -> dict[str, float]:
    return {k: float(getattr(constraints, k)) for k in CONSTRAINTS
            if getattr(constraints, k) is not None and (quality or k not in QUALITY_CONSTRAINTS)}


def violations(c: dict[str, Any], constraints: ConstraintsConfig, quality: bool = True
               ) -> dict[str, str]:
    """Each constraint the candidate fails, and why (`quality` False: quality limits left out)."""
    out = {}
    for key, limit in _limits(constraints, quality).items():
        figure, sense, label, unit = constraint(key)
        v = c.get(figure)
        if v is None:
            out[key] = f"{label} not measured"
        elif (v - limit) * sense > 0:
            out[key] = f"{label} {fmt(v)}{unit} vs limit {fmt(limit)}{unit}"
    return out


def settings(c: dict[str, Any]) -> dict[str, Any]:
    """What a server needs to run the configuration (the record's settings, no figures)."""
    if c["runtime"] == "llama_cpp":
        keys = ("runtime", "quant", "n_threads", "n_batch", "flash_attn", "kv_type",
                "n_gpu_layers")
    else:
        keys = ("runtime", "device", "precision", "batch_size", "kv_cache", "attn", "compile")
        # the decode loop and what the model was loaded with, where the point has them
        more = ("decode", "compile_mode", "gemv", "fuse_qkv", "fuse_block", "inductor")
        return {**{k: c.get(k) for k in keys},
                **{k: c[k] for k in more if c.get(k) not in (None, "", False)}}
    return {k: c.get(k) for k in keys}


def _summary(c: dict[str, Any]) -> dict[str, Any]:
    return {"name": c["config"], "point": c["name"], "stage": c["stage"],
            "workload": c["workload"], "memory_kind": c["memory_kind"], "settings": settings(c),
            "quality_config": c.get("quality_config") or None,
            "figures": {k: c.get(k) for k in F.RECOMMENDED}}


def recommend(candidates: list[dict[str, Any]], cfg: ReportConfig, quality: bool = True
              ) -> dict[str, Any]:
    """The fastest candidate (cfg.objective) that meets every constraint, with the reason; or, when
    none does, which constraint fails and by how much (the best any candidate reached against
    each limit). `quality` False (random weights): speed and memory only, the quality limits
    left out and the answer says so."""
    limits = _limits(cfg.constraints, quality)
    objective = cfg.objective
    front, with_quality = frontier(candidates, objective, cfg.quality_metric)
    front_names = {c["name"] for c in front}
    checked = [(c, violations(c, cfg.constraints, quality)) for c in candidates
               if c.get(objective) is not None]
    passing = [c for c, v in checked if not v]
    out: dict[str, Any] = {"objective": objective, "constraints": limits,
                           "candidates": len(checked), "meeting_constraints": len(passing),
                           "frontier": [c["name"] for c in front],
                           "frontier_axes": [k for k, _ in axes(objective, with_quality)],
                           "quality_metric": cfg.quality_metric}
    if not checked:
        return {**out, "status": "no candidates", "reason": "no latency point ran on this "
                "hardware for this model (see the missing inputs)"}
    label = axis_label(objective)
    conds = ", ".join(describe(k, v) for k, v in limits.items()) or "no constraints"
    if passing:
        best = max(passing, key=lambda c: (c[objective], -(c.get("memory_gib") or 0)))
        reason = (f"highest {label} ({fmt(best[objective])}) among the {len(passing)} of "
                  f"{len(checked)} configurations that meet {conds}")
        on = best["name"] in front_names
        reason += "; on the Pareto frontier" if on else "; not on the frontier"
        if not quality:
            reason += f"; {NO_QUALITY}"
        elif best.get("quality") is None:
            reason += "; its quality was not measured"
        runner_up = [c["name"] for c in sorted(passing, key=lambda c: -c[objective])[1:4]]
        kept = {} if quality else {"quality": NO_QUALITY}
        return {**out, "status": "recommended", **_summary(best), "reason": reason,
                "alternatives": runner_up, **kept}
    failing: dict[str, Any] = {}
    for key, limit in limits.items():
        figure, sense, _, _ = constraint(key)
        values = [c[figure] for c, _ in checked if c.get(figure) is not None]
        n_pass = sum(1 for c, v in checked if key not in v)
        entry: dict[str, Any] = {"limit": limit, "measured": len(values), "passing": n_pass}
        if values:
            best_v = min(values) if sense > 0 else max(values)
            entry["best"] = best_v
            entry["short_by"] = max(0.0, (best_v - limit) * sense)
        failing[key] = entry
    # the candidate closest to meeting them all: the smallest largest relative shortfall
    closest = min((c for c, _ in checked), key=lambda c: _shortfall(c, cfg.constraints, quality))
    parts = []
    for key, e in failing.items():
        _, _, lab, unit = constraint(key)
        if e["measured"] == 0:
            parts.append(f"{lab}: not measured for any configuration")
        elif e["passing"] == 0:
            parts.append(f"{lab}: best {fmt(e['best'])}{unit} misses the limit "
                         f"{fmt(e['limit'])}{unit} by {fmt(e['short_by'])}{unit}")
        else:
            parts.append(f"{lab}: {e['passing']} of {len(checked)} meet it")
    fails = violations(closest, cfg.constraints, quality)
    return {**out, "status": "none",
            "reason": "no configuration meets " + conds + " — " + "; ".join(parts),
            "constraint_check": failing, "closest": {**_summary(closest), "fails": fails}}


def describe(key: str, limit: float) -> str:
    _, sense, label, unit = constraint(key)
    return f"{label} {'≤' if sense > 0 else '≥'} {fmt(limit)}{unit and ' ' + unit}"


def _shortfall(c: dict[str, Any], constraints: ConstraintsConfig, quality: bool = True) -> float:
    worst = 0.0
    for key, limit in _limits(constraints, quality).items():
        figure, sense = CONSTRAINTS[key]
        v = c.get(figure)
        if v is None:
            worst = max(worst, 1e9)
        elif limit:
            worst = max(worst, (v - limit) * sense / abs(limit))
    return worst
