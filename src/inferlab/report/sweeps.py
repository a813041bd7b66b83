"""Which comparisons a section shows, sweep by sweep. Two points are compared only where they were
measured together, in one sweep on one machine instance (a group): `together` makes a comparison
within each group and keeps the ranked group's, else the newest that holds both sides; where no
group holds both, it says so instead of comparing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferlab.config import FOUR_BIT, SIXTEEN_BIT
from inferlab.report.comparisons import HF_4, HF_8, HF_16, Comparison, best, hf_b1
from inferlab.report.table import Section


@dataclass(frozen=True)
class Shown:
    """A comparison as the report shows it, and where it was made."""

    comparison: Comparison
    group: tuple | None = None  # the (sweep, instance) it was made in, where there are several
    same_in: int = 0  # other sweeps that compared the same configurations
    others_in: int = 0  # further sweeps that compared other configurations (counted, not shown)
    apart: bool = False  # both sides measured, never in one group: not compared


def together(section: Section, compare: Callable[[Section], list[Comparison]]) -> list[Shown]:
    """`compare` made within one group at a time. Per topic: the first group's comparison and the
    next one's over other configurations (further ones counted); where none was made, the first
    group's reason; where only mixed groups hold both sides, not compared."""
    if not section.history:
        return [Shown(c) for c in compare(section)]
    found: dict[str, list[tuple[tuple, Comparison]]] = {}
    for g in section.groups:
        for c in compare(section.view(g)):
            found.setdefault(c.topic, []).append((g, c))
    mixed = {c.topic: c for c in compare(section.merged()) if c.made}
    out = []
    for topic, entries in found.items():
        complete = [(g, c) for g, c in entries if c.made]
        if not complete:
            out.append(Shown(entries[0][1], apart=topic in mixed))
            continue
        alike: dict[tuple, list[tuple[tuple, Comparison]]] = {}
        for g, c in complete:  # another sweep may hold other configurations: its own comparison
            alike.setdefault(c.configurations(), []).append((g, c))
        kinds = list(alike.values())
        for i, same in enumerate(kinds[:2]):  # the ranked group's, the next comparing others
            more = sum(len(k) for k in kinds[2:]) if i == 1 else 0
            out.append(Shown(same[0][1], same[0][0], len(same) - 1, more))
    out += [Shown(mixed[t], apart=True) for t in sorted(set(mixed) - set(found))]
    return out


PROFILE_COLUMNS = (("name", "profiled configuration"), ("sweep", "sweep"), ("window", "window"),
                   ("profiled_step_ms", "step ms"), ("kernel_ms_per_step", "kernels ms"),
                   ("launch_gap_ms_per_step", "launch gaps ms"),
                   ("host_wait_ms_per_step", "host waits ms"),
                   ("kernels_per_step", "kernels/step"),
                   ("matmul_ms", "matmul ms"),
                   ("weight_gbps_over_matmul", "weights GB/s in matmuls"),
                   ("top_kernel", "largest kernel (ms/step)"))
STEP_FIGURES = ("profiled_step_ms", "kernel_ms_per_step", "launch_gap_ms_per_step",
                "host_wait_ms_per_step", "kernels_per_step")


def profiles(section: Section) -> list[dict[str, Any]]:
    """One row per kernel-level profile of decode steps (the profile scenario)."""
    rows = []
    for r in section.rows:
        if r["scenario"] != "profile" or r["status"] != "ok":
            continue
        m = r["_metrics"]
        top = (m.get("top_kernels") or [{}])[0]
        matmul = (m.get("ms_per_step_by_kind") or {}).get("matmul")
        gbps = m.get("weight_gbps_over_matmul")
        device_gbps = (m.get("bandwidth") or {}).get("bandwidth_gbps")
        if gbps and device_gbps and gbps > 1.1 * device_gbps:
            gbps = None  # weights read by kernels not classed as matmuls (inductor's reductions)
        top_kernel = f"{top.get('name', '')[:48]} ({top.get('ms_per_step', '')})" if top else ""
        rows.append({"name": r["name"].removesuffix("-profile"), "sweep": r.get("sweep_id"),
                     "window": m.get("window"), **{k: m.get(k) for k in STEP_FIGURES},
                     "matmul_ms": matmul, "weight_gbps_over_matmul": gbps,
                     "top_kernel": top_kernel})
    return rows


def _llama(quants: tuple[str, ...]):
    return lambda r: r["runtime"] == "llama_cpp" and r.get("quant") in quants


# (kind, which latency points, the figure that ranks them): the fastest of each kind in each sweep
KINDS_SIDE_BY_SIDE = (
    ("transformers, 16-bit, batch 1", hf_b1(HF_16), "decode_tps"),
    ("transformers, 8-bit, batch 1", hf_b1(HF_8), "decode_tps"),
    ("transformers, 4-bit, batch 1", hf_b1(HF_4), "decode_tps"),
    ("llama.cpp, 16-bit", _llama(SIXTEEN_BIT["llama_cpp"]), "decode_tps"),
    ("llama.cpp, 8-bit", _llama(("q8_0",)), "decode_tps"),
    ("llama.cpp, 4-bit", _llama(FOUR_BIT["llama_cpp"]), "decode_tps"),
    ("transformers, batch > 1 (total tokens/s)",
     lambda r: r["runtime"] == "hf" and (r.get("batch_size") or 1) > 1, "total_tps"),
)


@dataclass(frozen=True)
class Fastest:
    """The fastest point of each kind in one sweep: kind -> (figure, point name)."""

    group: tuple
    found: dict[str, tuple[Any, str]]


def side_by_side(section: Section) -> tuple[list[str], list[Fastest]]:
    """(the kinds any sweep measured, the fastest of each kind per sweep: ranked sweep first, then
    newest); empty unless two or more sweeps measured something."""
    if not section.history:
        return [], []
    gpu = any(r["device"] == "cuda" for r in section.ok())
    device = "cuda" if gpu else "cpu"  # a GPU host's CPU sweep is not beside its GPU figures
    rows, kinds = [], set()
    for g in section.groups:
        cands = [r for r in section.view(g).candidates if r["device"] == device]
        found = {}
        for kind, which, key in KINDS_SIDE_BY_SIDE:
            top = best([r for r in cands if which(r)], key)
            if top is not None:
                found[kind] = (top[key], top["name"])
        if found:
            rows.append(Fastest(g, found))
            kinds.update(found)
    if len(rows) < 2:
        return [], []
    return [kind for kind, _, _ in KINDS_SIDE_BY_SIDE if kind in kinds], rows
