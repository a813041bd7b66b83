"""The report's pages: metrics/report.md (the answer and the lead section in full, a summary of
each other machine and model), metrics/report/<hardware>--<model>.md (one page each), and
report.html (everything, other machines and models folded)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from inferlab import fields as F
from inferlab.report.frontier import CONSTRAINTS, axis_label, describe
from inferlab.report.render import cell, with_unit
from inferlab.report.sentences import sentence
from inferlab.report.sweeps import Shown
from inferlab.report.table import Section

FOLDER = "report"  # the folder of the other sections' pages, under metrics/
HISTORY = "# History: other machines and models"
ANSWER_FIGURES = ("total_tps", "decode_tps", "ttft_ms", "itl_p90_ms", "memory_gib", "kl_mean",
                  "top1")


def _titled(name: str) -> str:
    """A field's column title, with its unit where the title lacks it ("KL (nats/token)")."""
    f = F.field(name)
    return f.title if f.unit.replace("tokens/", "tok/") in f.title else f"{f.title} ({f.unit})"


def answer_table(results: list[tuple[Section, dict[str, Any]]]) -> str:
    heads = ["hardware", "model", "recommended", *map(_titled, ANSWER_FIGURES), "why"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for s, rec in results:
        why = cell(rec["reason"])
        if rec["status"] == "recommended":
            figs = " | ".join(cell(rec["figures"][k]) for k in ANSWER_FIGURES)
            lines.append(f"| {s.hardware} | {s.model} | **{rec['name']}** | {figs} | {why} |")
        else:
            none = " | ".join("—" for _ in ANSWER_FIGURES)
            lines.append(f"| {s.hardware} | {s.model} | none | {none} | {why} |")
    return "\n".join(lines)


def missing_inputs(sections: list[Section]) -> list[str]:
    """What the study lacks, in words (never an error)."""
    out = []
    for stage, what, how in (
        ("bench_gpu", "GPU benchmark results",
         "run the bench_gpu stage on a CUDA machine (see README, scripts/gpu_run.sh)"),
        ("bench_cpu", "CPU benchmark results", "run the bench_cpu stage"),
    ):
        rows = [r for s in sections for r in s.rows if r["stage"] == stage]
        if not any(r["status"] == "ok" for r in rows):
            seen = sorted({f"{r['hardware']}: {r['status']} ({(r['reason'] or '')[:100]})"
                           for r in rows})
            said = f" Records say {'; '.join(seen[:3])}." if seen else ""
            out.append(f"No {what}: {how}.{said}")
    if not any(s.quality for s in sections):
        out.append("No quality scores: run the evaluate stage.")
    for s in sections:
        out += _lacks(s)
    return out


def _lacks(s: Section) -> list[str]:
    out = []
    if s.candidates and not s.scored:
        out.append(f"{s.title}: quality not measured (run evaluate with this model on this "
                   "machine); its frontier ranks speed and memory only.")
    elif s.candidates:
        unscored = [c["config"] for c in s.candidates if c.get("quality") is None]
        if unscored:
            out.append(f"{s.title}: {len(unscored)} of {len(s.candidates)} benchmarked "
                       "configurations have no quality score of the same configuration "
                       f"({', '.join(unscored[:5])}{' …' if len(unscored) > 5 else ''}).")
    if s.scored and not any(r["status"] == "ok" for r in s.rows):
        out.append(f"{s.title}: quality only; speed not measured.")
    failed = [r for r in s.rows if r["status"] == "failed"]
    if failed:
        out.append(f"{s.title}: {len(failed)} benchmark point(s) failed (listed in its section).")
    return out


def page_name(s: Section) -> str:
    return f"{FOLDER}/{s.slug}.md"


def summary_md(s: Section, rec: dict[str, Any], headline: list[Shown]) -> str:
    """One screen of another machine and model: answer, headline comparisons, link to its page."""
    out = [f"## {s.title}", ""]
    if rec["status"] == "recommended":
        f = rec["figures"]
        out += [f"Recommended: **{rec['name']}**, {with_unit(f, 'total_tps')} in total, "
                f"{with_unit(f, 'decode_tps')} per sequence, {with_unit(f, 'memory_gib')} "
                f"({rec['memory_kind']}); weights {s.weights or 'unknown'}.", ""]
    else:
        out += [f"No recommendation: {rec['reason']}.", ""]
    out += [*[f"- {sentence(h)}" for h in headline], *([""] if headline else [])]
    page = page_name(s)
    out += ["Every table, figure and quality score of this machine and model: "
            f"[{page}]({page}).", ""]
    return "\n".join(out)


def index_md(sections: list[Section]) -> str:
    """metrics/report/index.md: every machine and model with records, the first in report.md.

    Always written: git keeps no empty folder, and DVC reruns a stage whose out is missing."""
    out = ["[← the report](../report.md)", "", "# Every machine and model with records", ""]
    out += [f"- {s.title}: [in the report](../report.md)" if i == 0 else f"- [{s.title}]({s.slug}.md)"
            for i, s in enumerate(sections)]
    return "\n".join(out if sections else [*out, "No records yet: run the study."]) + "\n"


def page_md(section: str) -> str:
    """A section as a page of its own under metrics/report/."""
    return f"[← the report](../report.md)\n\n{section}\n"


def _head(header: dict[str, Any], answer: str, missing: list[str]) -> list[str]:
    conds = ", ".join(describe(k, v) for k, v in header["constraints"].items()) or "none"
    out = ["# inferlab report: which configuration to use", "",
           f"Built from the records under `results/` only ({header['records']} records), "
           f"{header['generated']}, code at commit {header['commit']}. "
           f"Objective: highest {axis_label(header['objective'])}. "
           f"Constraints (`report.constraints` in conf/config.yaml): {conds}. Quality axis: "
           f"{axis_label(header['quality_metric'])} (`report.quality_metric`), against the full "
           "precision of each runtime.", "",
           "## The answer", "", answer, ""]
    return out + (["## What is missing", "", *[f"- {m}" for m in missing], ""] if missing else [])


HISTORY_NOTE = "Records of other machines and models in `results/`, kept as they were measured."
FOOT = ["---", f"Constraints checked: {', '.join(CONSTRAINTS)}. Machine-readable: "
        "`metrics/recommendation.json` (the serving stage loads it), `metrics/answer.json` "
        "(DVC metrics), `metrics/plots/frontier.csv` (DVC plots). Other machines and models in "
        "full: `metrics/report/*.md`, and `metrics/report.html` (folded).", ""]


def report_md(header: dict[str, Any], answer: str, missing: list[str], lead: str,
              summaries: list[str]) -> str:
    """The report: its answer, the lead section (this run's, else the first) in full, then a
    summary of each other machine and model."""
    out = [*_head(header, answer, missing), *([lead] if lead else [])]
    if summaries:
        note = f"{HISTORY_NOTE} Each has a page of its own under `metrics/report/`."
        out += [HISTORY, "", note, "", *summaries]
    return "\n".join(out + FOOT)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
         "line-height:1.45}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
         "img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:1px 3px}"
         "summary{font-size:1.3em;font-weight:600;cursor:pointer;margin:.6em 0}")


def to_html(header: dict[str, Any], answer: str, missing: list[str], lead: str,
            history: list[tuple[str, str]], base: Path) -> str:
    """Everything in one file, figures embedded as data URIs; each other machine and model is a
    folded section (history: (summary line, its section's markdown))."""
    body = _html("\n".join([*_head(header, answer, missing), lead]), base)
    if history:
        body += _html(f"{HISTORY}\n\n{HISTORY_NOTE}\n", base)
    for summary, section in history:
        folded = _html(section, base)
        body += f"<details><summary>{html.escape(summary)}</summary>\n{folded}</details>\n"
    body += _html("\n".join(FOOT), base)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>inferlab report</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def _html(markdown_text: str, base: Path) -> str:
    """HTML of markdown (raw HTML in it escaped), each figure embedded."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)

    def embed(m: re.Match) -> str:
        path = base / html.unescape(m.group(1))
        if not path.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    return re.sub(r'src="([^"]+\.png)"', embed, body)
