"""A section of the report as markdown: its tables and the prose around them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from inferlab import fields as F
from inferlab.report.sentences import quality_text, sentence, with_ci
from inferlab.report.sweeps import PROFILE_COLUMNS, Fastest, Shown
from inferlab.report.table import Section, fmt


def columns(*names: str | tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """(key, column title): a field's title from the field table, or the report's own column."""
    return tuple((n, F.field(n).title) if isinstance(n, str) else n for n in names)


ACROSS = ("across", f"{F.field('decode_tps').title} across sweeps")  # a point's, in several sweeps
CANDIDATE_COLUMNS = columns("config", "workload", "batch_size", "n_threads", "decode_tps",
                            "decode_tps_stdev", "total_tps", "ttft_ms", "itl_p50_ms", "itl_p90_ms",
                            "memory_gib", "roofline_fraction", "kl_mean", "top1", "ppl_ratio",
                            ACROSS, ("frontier", "frontier"))
OTHER_COLUMNS = columns("config", ("sweep", "sweep"), "decode_tps", "total_tps", "ttft_ms",
                        "memory_gib", ACROSS)
QUALITY_COLUMNS = columns("config", "status", "bits_per_weight",
                          ("kl", f"{F.field('kl_mean').words} (95% CI)"), "kl_p99", "kl_max",
                          ("top1_ci", f"{F.field('top1').words} (95% CI)"), "perplexity",
                          ("ppl_ratio_ci", f"{F.field('ppl_ratio').title} (95% CI)"),
                          "task_rougeL", "task_exact_match", "drift_rougeL", "drift_exact_match",
                          "tokens_scored", "reason")


def across(r: dict[str, Any]) -> str:
    """A point's decode speed across the sweeps that measured it: median (min–max), n sweeps; ⚠
    where it spreads more than a run does."""
    n = r.get("sweeps") or 0
    if n < 2:
        return ""
    text = (f"{fmt(r['decode_tps_sweeps_median'])} ({fmt(r['decode_tps_sweeps_min'])}–"
            f"{fmt(r['decode_tps_sweeps_max'])}), {int(n)} sweeps")
    return text + (" ⚠" if r.get("sensitive") else "")


def _spread_notes(rows: list[dict[str, Any]]) -> list[str]:
    return [f"- ⚠ {r['config']}: {r['sensitive']}." for r in rows if r.get("sensitive")]


def _quality_order(r: dict[str, Any]) -> tuple:
    return r.get("runtime") or "", r.get("kl_mean") is None, r.get("kl_mean") or 0, r["config"]


def quality_table(rows: list[dict[str, Any]]) -> str:
    shown = []
    for r in sorted(rows, key=_quality_order):
        if r.get("reference") == "itself":  # full precision: the others are measured against it
            shown.append({**r, "kl": "reference", "kl_p99": None, "kl_max": None,
                          "top1_ci": "reference", "ppl_ratio_ci": "reference"})
            continue
        kl = (r.get("kl_mean"), r.get("kl_ci_low"), r.get("kl_ci_high"))
        top1 = (r.get("top1"), r.get("top1_ci_low"), r.get("top1_ci_high"))
        ratio = (r.get("ppl_ratio"), r.get("ppl_ratio_ci_low"), r.get("ppl_ratio_ci_high"))
        shown.append({**r, "kl": with_ci(*kl), "top1_ci": with_ci(*top1, "pct"),
                      "ppl_ratio_ci": with_ci(*ratio, "ratio")})
    return table(shown, QUALITY_COLUMNS)


def cell(v: Any) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return fmt(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    cols = [(k, h) for k, h in columns if any(r.get(k) not in ("", None) for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def with_unit(figures: dict[str, Any], name: str) -> str:
    """A recommended figure with its unit (from the field table)."""
    v, unit = figures[name], F.field(name).unit
    return cell(v) + (f" {unit}" if unit and v not in (None, "") else "")


def _pivot_label(c: dict[str, Any]) -> str:
    label = f"{c['precision']} {c['kv_cache']}" + (" compiled" if c.get("compile") is True else "")
    if c.get("compile_mode") not in ("", None, "reduce-overhead") and c.get("compile") is True:
        label += f" ({c['compile_mode']})"
    if c.get("decode") not in ("", None, "generate"):
        label += f", {c['decode']} loop"
    return label


def pivot(cands: list[dict[str, Any]]) -> str:
    """transformers points as precision (and cache/compile) x batch: total tok/s, decode tok/s per
    sequence, peak memory in each cell."""
    hf = [c for c in cands if c["runtime"] == "hf" and c.get("attn") == "sdpa"]
    batches = sorted({int(c["batch_size"] or 1) for c in hf})
    if len(batches) < 2:
        return ""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for c in hf:
        rows.setdefault(_pivot_label(c), {})[int(c["batch_size"] or 1)] = c
    lines = ["| precision, KV cache | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|" + "---|" * (len(batches) + 1)]
    for label, by_batch in rows.items():
        cells = []
        for b in batches:
            c = by_batch.get(b)
            cells.append("" if c is None else f"{cell(c['total_tps'])} / "
                         f"{cell(c['decode_tps'])} / {cell(c['memory_gib'])} GiB")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _not_run(section: Section) -> str:
    """Failed and skipped points; many skipped for one reason collapse into one line."""
    rows = section.not_ok()
    if not rows:
        return ""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        reason = (r.get("reason") or "no reason recorded")[:240]
        by_reason.setdefault((r["status"], reason), []).append(r.get("name") or r.get("config"))
    out = ["| status | points | reason |", "|---|---|---|"]
    for (status, reason), names in sorted(by_reason.items()):
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        out.append(f"| {status} | {cell(shown)} | {cell(reason)} |")
    return "\n".join(out)


RANDOM_WEIGHTS = ("Speed and memory depend on shapes only and are real figures; quality figures "
                  "show how far each configuration drifts from its reference, not language "
                  "quality: random weights give near-uniform distributions, where the smallest "
                  "change flips the top token.")
PROFILES = ("Kernel-level profiles (torch.profiler) of decode steps, per generated token: time "
            "in GPU kernels, idle gaps shorter than 10 µs between kernels (launch latency, also "
            "inside a CUDA graph) and longer ones (the GPU waiting for the host); weights GB/s "
            "is the rate the weights are read at while matrix kernels run.")
SIDE_BY_SIDE = ("Each cell: decode tokens/s per sequence (batch > 1: total tokens/s) of the "
                "fastest configuration of that kind in that sweep. A row was measured together "
                "(one sweep on one machine instance) and compares within itself; down a column "
                "the figures come from different machine instances and often from other "
                "configurations, so they show how far each sweep got, not a speed-up.")
CONFIGURATIONS = ("roofline is the fraction of the memory-bandwidth limit; KL (mean KL "
                  "divergence per token, nats), top-1 agreement and perplexity ratio against "
                  "the full precision of the same runtime, from the evaluate stage (joined by "
                  "runtime, device, precision or quant and KV cache).")
OTHER_SWEEPS = ("Figures of different sweeps or machine instances are not compared: host-bound "
                "points move with the machine. Each row is the point's latest record.")
GGUF_HOLDS = ("llama.cpp stores a tensor in another type where the type's blocks do not divide "
              "its rows (k-quants need rows of 256), so a file's name may promise fewer bits "
              "than it holds; measured from each file (`metrics/gguf.json`):")
QUALITY = ("Per token, over the same token ids of held-out text, against the full precision of "
           "the same runtime measured in the same sweep (llama.cpp's `--kl-divergence` method): "
           "mean KL divergence of the next-token distribution (nats), its 99th percentile and "
           "maximum, how often the most likely next token agrees (Wilson interval), and the "
           "perplexity ratio. Intervals treat tokens as independent; neighbouring tokens are "
           "correlated, so the true uncertainty is somewhat wider. Task scores are the "
           "generated answers against the evaluation set's references; drift compares them with "
           "the full precision's own answers (how much the text changed, not whether it got "
           "worse).")
FASTER = "### Faster decoding: the peer runtime, prompt lookup, and where a step's time goes"


def section_md(s: Section, rec: dict[str, Any], headline: list[Shown], caching: list[Shown],
               figures: list[tuple[str, Path]], link_from: Path, front_names: set[str],
               faster: list[Shown] | None = None, profiles: list[dict[str, Any]] | None = None,
               side: tuple[list[str], list[Fastest]] | None = None) -> str:
    """A section; figure links start from `link_from`."""
    out = [f"## {s.title}", ""]
    if s.weights and s.weights != "real":
        out += [f"_Weights: {s.weights}. {RANDOM_WEIGHTS}_", ""]
    elif s.model_note:
        out += [f"_Weights: {s.weights}; {s.model_note}_", ""]
    out += _recommendation(rec)
    for title, shown in (("Headline comparisons", headline),
                         ("KV cache, prompt cache and streaming", caching)):
        out += [f"### {title}", "", *[f"- {sentence(x)}" for x in shown], ""] if shown else []
    if faster or profiles:
        out += [FASTER, "", *[f"- {sentence(f)}" for f in faster or []], *([""] if faster else [])]
        out += [PROFILES, "", table(profiles, PROFILE_COLUMNS), ""] if profiles else []
    if side and side[1]:
        out += _side_by_side(*side)
    if figures:
        out += ["### Figures", ""]
        for caption, path in figures:
            out += [f"![{caption}]({Path(os.path.relpath(path, link_from)).as_posix()})", ""]
    out += _candidates(s, rec, front_names) + _other_sweeps(s) + _gguf(s) + _quality(s)
    not_run = _not_run(s)
    return "\n".join(out + (["### Points that did not run", "", not_run, ""] if not_run else []))


def _recommendation(rec: dict[str, Any]) -> list[str]:
    out = ["### Recommendation", ""]
    if rec["status"] != "recommended":
        out += [f"No recommendation: {rec['reason']}.", ""]
        if c := rec.get("closest"):
            out += [f"Closest: **{c['name']}**, which fails {'; '.join(c['fails'].values())}.", ""]
        return out
    f = rec["figures"]
    settings = ", ".join(f"{k}={v}" for k, v in rec["settings"].items())
    out += [f"**{rec['name']}** ({settings}): "
            f"{with_unit(f, 'total_tps')} in total, {with_unit(f, 'decode_tps')} per sequence, "
            f"TTFT {with_unit(f, 'ttft_ms')}, ITL p90 {with_unit(f, 'itl_p90_ms')}, "
            f"{with_unit(f, 'memory_gib')} ({rec['memory_kind']}), {quality_text(f)}.", "",
            f"Why: {rec['reason']}.", ""]
    if rec.get("alternatives"):
        out += [f"Next fastest that meet the constraints: {', '.join(rec['alternatives'])}.", ""]
    return out


def _side_by_side(kinds: list[str], rows: list[Fastest]) -> list[str]:
    head = ["sweep", *kinds]
    return ["### The fastest of each kind, sweep by sweep", "", SIDE_BY_SIDE, "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *[_fastest_row(r, kinds) for r in rows], ""]


def _fastest_row(row: Fastest, kinds: list[str]) -> str:
    cells = [f"{fmt(row.found[k][0])} ({row.found[k][1]})" if k in row.found else ""
             for k in kinds]
    return "| " + " | ".join([Section.label(row.group), *cells]) + " |"


def _latency_configs(s: Section) -> set[str]:
    return {r["config"] for r in s.rows if r["status"] == "ok" and r["scenario"] == "latency"}


def _candidates(s: Section, rec: dict[str, Any], front_names: set[str]) -> list[str]:
    """The ranked configurations: precision x batch, the full table, the Pareto frontier."""
    cands, out = s.candidates, []
    if cands and s.history:
        others = _latency_configs(s) - {c["config"] for c in cands}
        more = (f"; {len(others)} more, measured in other sweeps, are listed apart and not ranked "
                "against them." if others else ".")
        out += [f"Ranked together: the {len(cands)} configurations measured in "
                f"{s.label(s.ranked_group)}{more}", ""]
    if not cands:
        return out
    rows = [{**c, "frontier": c["name"] in front_names, "across": across(c)} for c in cands]
    mem_kinds = ", ".join(sorted({c["memory_kind"] for c in cands}))
    if grid := pivot(cands):
        out += ["### Precision × batch (transformers)", "",
                "Each cell: total tokens/s / decode tokens/s per sequence / peak memory.", "",
                grid, ""]
    out += ["### Configurations: speed, memory and quality", "",
            f"Medians over the repetitions (warm-up excluded); memory is peak {mem_kinds}; "
            f"{CONFIGURATIONS}", "", table(rows, CANDIDATE_COLUMNS), "", *_spread_notes(rows)]
    out += [""] if any(r.get("sensitive") for r in rows) else []
    front = [r for r in rows if r["frontier"]]
    axes = rec.get("frontier_axes", [])
    out += ["### Pareto frontier", "", f"Axes: {', '.join(axes)}. {len(front)} of {len(cands)} "
            "configurations are not beaten on every axis at once by another.", ""]
    if front:
        shown = ("batch_size", "ttft_ms", "itl_p90_ms")
        picked = tuple(c for c in CANDIDATE_COLUMNS if c[0] in axes or c[0] in shown)
        cols = CANDIDATE_COLUMNS[:1] + picked
        out += [table(front, cols), ""]
    return out


def _other_sweeps(s: Section) -> list[str]:
    ranked = {c["config"] for c in s.candidates}
    other = [{**r, "sweep": s.label((r["sweep_id"], r["instance"])), "across": across(r)}
             for r in s.rows if r["status"] == "ok" and r["scenario"] == "latency"
             and r["config"] not in ranked and s.history]
    if not other:
        return []
    return ["### Measured in other sweeps (not ranked against the configurations above)", "",
            OTHER_SWEEPS, "", table(other, OTHER_COLUMNS), "", *_spread_notes(other), ""]


def _gguf(s: Section) -> list[str]:
    quants = {r.get("quant") for r in s.rows + s.quality if r.get("quant")}
    held = [label for ftype, label in sorted(s.files.items())
            if ftype in quants and label != ftype]
    if not held:
        return []
    return ["### What the GGUF files hold", "", GGUF_HOLDS, "", *[f"- {h}" for h in held], ""]


def _quality(s: Section) -> list[str]:
    if not s.quality:
        return []
    out = ["### Quality of every configuration evaluated here", "", QUALITY, ""]
    for q in s.quality:
        if q.get("vs_transformers_kl") is not None:
            out += [f"The two runtimes' references agree: llama.cpp's {q['quant']} file against "
                    "transformers' fp32 on the same ids, "
                    f"KL {fmt(q['vs_transformers_kl'])} nats per token, "
                    f"top-1 agreement {100 * q['vs_transformers_top1']:.2f}%.", ""]
    return [*out, *loop_checks(s.scored), quality_table(s.quality), ""]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not (a["kl_ci_low"] > b["kl_ci_high"] or b["kl_ci_low"] > a["kl_ci_high"])


def loop_checks(scored: list[dict[str, Any]]) -> list[str]:
    """Each decode loop scored through its own step against its precision's forward pass: whether
    the KL intervals overlap (a loop whose kernels compute something else shows up here)."""
    out = []
    for q in scored:
        if not q.get("loop") or q.get("kl_ci_low") is None:
            continue
        base = [p for p in scored if not p.get("loop") and p.get("device") == q.get("device")
                and p.get("precision") == q.get("precision") and p.get("kl_ci_low") is not None]
        if not base:
            continue
        p = min(base, key=lambda p: p.get("kv_cache") != "static")  # the static cache's, if scored
        side = "lower" if q["kl_mean"] < p["kl_mean"] else "higher"
        verdict = ("agrees with" if _overlap(q, p)
                   else f"**differs beyond their intervals** ({side}) from")
        out.append(f"- {q['config']} ({q['loop']}), scored through its own step: "
                   f"KL {_ci(q, 'kl')} {verdict} {p['config']}'s forward pass, KL {_ci(p, 'kl')}.")
    return [*out, ""] if out else []


def _ci(q: dict[str, Any], name: str) -> str:
    return f"{fmt(q[f'{name}_mean'])} ({fmt(q[f'{name}_ci_low'])}–{fmt(q[f'{name}_ci_high'])})"
