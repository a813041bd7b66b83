"""Stage `report`: the study's answer, from the records only.

Writes metrics/report.md, a page per other machine and model under metrics/report/, report.html
(everything, figures embedded; a placeholder where HTML is off), metrics/figures/*.png,
recommendation.json (what `inferlab serve` loads), answer.json (DVC metrics) and
plots/frontier.csv (DVC plots), and logs them as one MLflow report run. Missing inputs make a
report that says so; a metrics folder or file that cannot be written stops it before any work."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.config import StudyConfig, resolve, to_container
from inferlab.environment import environment
from inferlab.report import answer, comparisons, figures, frontier, pages, render, sweeps
from inferlab.report.sentences import same_format_elsewhere
from inferlab.report.table import Section, collect
from inferlab.stage import check_storage
from inferlab.tracking import Tracker

log = logging.getLogger(__name__)

STAGE = "report"
OUTPUTS = ("report.md", "report.html", "recommendation.json", "answer.json", "plots/frontier.csv")
HTML_OFF = ("<!doctype html>\n<html><body><p>HTML output is off "
            "(<code>report.html: false</code>); the report is <code>metrics/report.md</code>."
            "</p></body></html>\n")
FRONTIER_COLUMNS = ("hardware", "model", "config", "stage", "runtime", "precision", "quant",
                    "batch_size", "n_threads", "kv_cache", "kv_type", "compile", "decode_tps",
                    "total_tps", "ttft_ms", "itl_p90_ms", "memory_gib", "kl_mean", "top1",
                    "ppl_ratio", "quality", "on_frontier", "recommended")
Results = list[tuple[Section, dict[str, Any]]]


def _frontier_csv(results: Results) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FRONTIER_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for s, r in results:
        front = set(r.get("frontier", []))
        for c in s.candidates:
            w.writerow({**{k: c.get(k, "") for k in FRONTIER_COLUMNS}, "hardware": s.hardware,
                        "model": s.model, "on_frontier": c["name"] in front,
                        "recommended": r.get("point") == c["name"]})
    return buf.getvalue()


ANSWER_METRICS = ("ttft_ms", "itl_p90_ms", "memory_gib", "kl_mean", "top1")  # after the objective


def answer_metrics(results: Results, studied: dict[str, str], objective: str) -> dict[str, Any]:
    """metrics/answer.json: the studied machine and model's answer and a few of its figures, so
    `dvc metrics diff` is a changelog of the answer. Figures first: `dvc exp show` folds a table
    too wide for the terminal from the right."""
    key = (studied["hardware"], studied["model"])
    r = next((r for s, r in results if (s.hardware, s.model) == key), None)
    figures = (r or {}).get("figures") or {}
    out = {k: figures[k] for k in (objective, *ANSWER_METRICS) if figures.get(k) is not None}
    return out | {"recommended": "no records" if r is None else r.get("name") or "none", **studied}


def build(cfg: StudyConfig) -> dict[str, Any]:
    """Everything the report says, written to metrics/; returns the recommendation document."""
    rc = cfg.report
    results_dir, metrics_dir = resolve(cfg.paths.results), resolve(cfg.paths.metrics)
    subs = ("figures", "plots", pages.FOLDER)
    folders = [(f"paths.metrics ({sub})", metrics_dir / sub) for sub in subs]
    files = [("the report output", metrics_dir / n) for n in OUTPUTS]
    check_storage(cfg, folders=folders, files=files)
    env = environment()
    studied = {"hardware": env["hardware"]["id"], "model": cfg.model.name}  # this machine, model
    sections = this_run_first(collect(results_dir, rc.quality_metric, rc.models), studied)
    n_records = sum(len(s.rows) + len(s.quality) for s in sections)
    log.info("report: %d hardware/model section(s) from %d records", len(sections), n_records)
    real = comparisons.real_quality(sections)  # a format's cost on real weights, for random ones
    fig_dir, page_dir = metrics_dir / "figures", metrics_dir / pages.FOLDER
    drawn: set[Path] = set()
    results: Results = []
    lead, summaries, history, page_texts = "", [], [], {}
    for i, s in enumerate(sections):
        rcm, figs, headline, body = _section(s, rc, real, fig_dir)
        drawn.update(p for _, p in figs)
        results.append((s, rcm))
        if i == 0:  # this run's section (else the first): in full in report.md
            lead = body(metrics_dir)
        else:
            summaries.append(pages.summary_md(s, rcm, headline))
            page_texts[page_dir / f"{s.slug}.md"] = pages.page_md(body(page_dir))
            title = f"{s.title}: {rcm.get('name') or 'no recommendation'}"
            history.append((title, body(metrics_dir)))
        said = f" {rcm['name']}" if rcm["status"] == "recommended" else f" ({rcm['reason'][:160]})"
        log.info("report: %s: %s%s", s.title, rcm["status"], said)
    _remove_stale(fig_dir, "*.png", drawn)
    page_texts[page_dir / "index.md"] = pages.index_md(sections)
    _remove_stale(page_dir, "*.md", set(page_texts))
    header = {"records": n_records, "generated": rec.now()[:16].replace("T", " ") + " UTC",
              "commit": (env["git"].get("commit") or "unknown")[:10], "objective": rc.objective,
              "constraints": {k: v for k, v in to_container(rc.constraints).items()
                              if v is not None},
              "quality_metric": rc.quality_metric}
    answer_md = pages.answer_table(results) if results else "No records yet: run the study."
    head = (header, answer_md, pages.missing_inputs(sections))
    md = pages.report_md(*head, lead, summaries)
    rec.write_atomic(metrics_dir / "report.md", md)
    page_dir.mkdir(parents=True, exist_ok=True)  # a declared output: its index at least
    for path, text in page_texts.items():
        rec.write_atomic(path, text)
    # a declared output exists either way: with html off, a placeholder that says so
    html = pages.to_html(*head, lead, history, metrics_dir) if rc.html else HTML_OFF
    rec.write_atomic(metrics_dir / "report.html", html)
    doc = _write_answers(metrics_dir, results, rc, header, env, studied)
    log.info("report written: %s (%d figures), recommendation.json", metrics_dir / "report.md",
             len(drawn))
    # the same report (its text and pages without the time it was made) is logged to MLflow once
    text = md.replace(header["generated"], "") + "".join(page_texts.values())
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    _log_mlflow(cfg, doc, sorted(drawn), metrics_dir, digest)
    return doc


def _write_answers(metrics_dir: Path, results: Results, rc, header: dict, env: dict,
                   studied: dict[str, str]) -> dict[str, Any]:
    """recommendation.json, answer.json and plots/frontier.csv; returns the first."""
    doc = {  # no time of its own: the same records give the same file (serve_bench depends on it)
        "objective": rc.objective, "quality_metric": rc.quality_metric,
        "constraints": header["constraints"], "git_commit": env["git"].get("commit"),
        "studied": studied,
        "recommendations": [{"hardware": s.hardware, "model": s.model, "weights": s.weights, **r}
                            for s, r in results],
    }
    rec.write_json(metrics_dir / "recommendation.json", doc)
    metrics = answer_metrics(results, studied, rc.objective)
    rec.write_atomic(metrics_dir / "answer.json", json.dumps(metrics, indent=2) + "\n")  # unsorted
    rec.write_atomic(metrics_dir / "plots" / "frontier.csv", _frontier_csv(results))
    return doc


def _section(s: Section, rc, real: dict, fig_dir: Path):
    """A section's recommendation, figures, headline comparisons and markdown (a function of the
    folder its figure links start from)."""
    rcm = frontier.recommend(s.candidates, rc, quality=s.weights != "random")
    if rcm.get("quality") == frontier.NO_QUALITY:
        rcm["reason"] += same_format_elsewhere(rcm, s, real)
    front, with_quality = frontier.frontier(s.candidates, rc.objective, rc.quality_metric)
    figs = figures.draw_all(s, front, with_quality, rc.objective, fig_dir, rcm.get("point"))
    headline = sweeps.together(s, comparisons.headline)
    caching = sweeps.together(s, comparisons.cache_and_streaming)
    faster = sweeps.together(s, functools.partial(comparisons.faster_decoding, real=real))
    names = {c["name"] for c in front}
    profiles, side = sweeps.profiles(s.merged()), sweeps.side_by_side(s)

    def body(link_from: Path) -> str:
        return render.section_md(s, rcm, headline, caching, figs, link_from, names, faster,
                                 profiles, side)

    return rcm, figs, headline, body


def _remove_stale(folder: Path, pattern: str, kept: set[Path]) -> None:
    """Files of a section that no longer exists."""
    for stale in folder.glob(pattern) if folder.is_dir() else ():
        if stale not in kept:
            stale.unlink()


def this_run_first(sections: list[Section], studied: dict[str, str]) -> list[Section]:
    """This machine and the configured model's section first, the others in their order."""
    key = (studied["hardware"], studied["model"])
    mine = [s for s in sections if (s.hardware, s.model) == key]
    return mine + [s for s in sections if s not in mine]


def run_name(document: dict[str, Any]) -> str:
    """Short: what the report answers is the run's description (answer.lines)."""
    studied = document.get("studied") or {}
    return f"report: {studied['model']} on {studied['hardware']}" if studied else "report"


def _log_mlflow(cfg: StudyConfig, document: dict[str, Any], figs: list[Path], metrics_dir: Path,
                digest: str) -> None:
    params: dict[str, Any] = {"objective": document["objective"],
                              "quality_metric": document["quality_metric"],
                              **{f"constraint.{k}": v for k, v in document["constraints"].items()}}
    metrics: dict[str, float] = {}
    for r in document["recommendations"]:
        key = f"{r['hardware']}.{r['model']}"
        params[f"recommended.{key}"] = r.get("name", "none")
        for k, v in (r.get("figures") or {}).items():
            if v is not None:
                metrics[f"{key}.{k}"] = float(v)
    names = ("report.md", "report.html", "recommendation.json", "answer.json")
    files = [metrics_dir / n for n in names if (metrics_dir / n).is_file()]
    Tracker(cfg.tracking).log_report(run_name(document), params, metrics, files, figs, digest,
                                     description="\n".join(answer.lines(document)))


def run(cfg: StudyConfig) -> dict[str, Any]:
    return build(cfg)
