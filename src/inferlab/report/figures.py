"""The report's figures (PNG, matplotlib), one set per hardware and model, drawn from the same rows as its tables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inferlab.report.comparisons import llama_grid, plain_hf, plain_llama
from inferlab.report.frontier import axis_label
from inferlab.report.table import Section

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _kind(r: dict[str, Any]) -> str:
    return str(r.get("precision") or r.get("quant"))


def throughput(section: Section, path: Path) -> bool:
    """Total tokens/s against batch size per precision (transformers); decode tokens/s against threads per
    quant (llama.cpp)."""
    cands = section.candidates
    hf = [r for r in cands if r["runtime"] == "hf" and (plain_hf(r) or r.get("compile") is True)]
    grid = llama_grid(cands)
    llama = [r for r in cands if plain_llama(r, None, grid)]
    panels = [p for p in (("hf", hf), ("llama", llama)) if p[1]]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if kind == "hf":
                label = _kind(r) + (" static+compile" if r.get("compile") is True else "")
                if r.get("decode") not in ("", None, "generate"):
                    label += f" {r['decode']} loop"
                if r.get("compile_mode") not in ("", None, "reduce-overhead") and r.get("compile") is True:
                    label += f" {r['compile_mode']}"
                series.setdefault(label, []).append((r["batch_size"], r["total_tps"]))
            else:
                series.setdefault(_kind(r), []).append((r["n_threads"], r["decode_tps"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if kind == "hf":
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
            ax.set_yscale("log")
            ax.set_xlabel("batch size (sequences)")
            ax.set_ylabel("total tokens/s (all sequences)")
            ax.set_title("transformers: throughput vs batch")
        else:
            ax.set_xlabel("threads")
            ax.set_ylabel("decode tokens/s")
            ax.set_title("llama.cpp: decode speed vs threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(section.title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return True


def _bars(path: Path, labels: list[str], values: list[float], colors: Any, text: str, xlabel: str, title: str,
          log: bool = False) -> None:
    """A horizontal bar chart, top to bottom in the given order, each bar with its value written beside it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.48 * len(labels) + 1.4))
    ax.barh(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.text(v, i, " " + text.format(v), va="center", fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    _save(fig, path)
    plt.close(fig)


def memory(section: Section, path: Path) -> bool:
    """Peak memory per precision / quant, one sequence."""
    cands = section.candidates
    threads = max((r.get("n_threads") or 0 for r in cands if r["runtime"] == "llama_cpp"), default=None)
    grid = llama_grid(cands)
    bars = [r for r in cands if r.get("memory_gib") is not None
            and ((plain_hf(r) and r.get("batch_size") == 1) or plain_llama(r, threads, grid))]
    if not bars:
        return False
    kinds = ", ".join(sorted({r["memory_kind"] for r in bars}))
    _bars(path, [f"{'transformers' if r['runtime'] == 'hf' else 'llama.cpp'} {_kind(r)}" for r in bars],
          [r["memory_gib"] for r in bars], "tab:blue", "{:.2f}",  # type: ignore[misc]
          f"peak memory, GiB ({kinds}), batch 1", f"Peak memory per precision — {section.title}")
    return True


def quality_vs_speed(section: Section, front: list[dict[str, Any]], with_quality: bool, objective: str,
                     path: Path, recommended: str | None = None) -> bool:
    """Quality (or memory, where quality was not measured) against speed: one colour per precision / quant,
    marker area by memory, the Pareto frontier ringed, the recommendation starred."""
    y_key = "quality" if with_quality else "memory_gib"
    pts = [r for r in section.candidates if r.get(objective) is not None and r.get(y_key) is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    kinds = sorted({f"{'llama.cpp ' if r['runtime'] == 'llama_cpp' else ''}{_kind(r)}" for r in pts})
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    mem_max = max(r.get("memory_gib") or 0 for r in pts) or 1
    for i, k in enumerate(kinds):
        rows = [r for r in pts if f"{'llama.cpp ' if r['runtime'] == 'llama_cpp' else ''}{_kind(r)}" == k]
        ax.scatter([r[objective] for r in rows], [r[y_key] for r in rows], color=cmap(i % cmap.N),
                   s=[20 + 140 * (r.get("memory_gib") or 0) / mem_max for r in rows], alpha=0.8, label=k,
                   zorder=2)
    names = {r["name"] for r in front}
    fr = [r for r in pts if r["name"] in names]
    if fr:
        ax.scatter([r[objective] for r in fr], [r[y_key] for r in fr], s=170, facecolors="none",
                   edgecolors="tab:red", linewidths=1.3, zorder=3, label="Pareto frontier")
    rec = next((r for r in pts if r["name"] == recommended), None)
    if rec is not None:
        ax.scatter([rec[objective]], [rec[y_key]], marker="*", s=260, color="black", zorder=4,
                   label="recommended")
        ax.annotate(rec["config"], (rec[objective], rec[y_key]), fontsize=8, xytext=(-10, -16),
                    textcoords="offset points", ha="right")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax.set_xlabel(axis_label(objective) + " (marker area: peak memory)")
    ax.set_ylabel(axis_label(section.quality_metric) if with_quality else "peak memory, GiB")
    if with_quality and section.quality_metric == "kl_mean":
        ax.set_yscale("symlog", linthresh=1e-4)  # KL spans decades; the reference itself sits at 0
        ax.invert_yaxis()  # better quality up
    title = "Quality vs speed" if with_quality else "Memory vs speed (quality not measured here)"
    if with_quality and section.weights != "real":
        title += " — random weights: quality figures measure numerics only"
    ax.set_title(f"{title}\n{section.title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


def prompt_cache(section: Section, path: Path) -> bool:
    """TTFT of requests sharing a long prefix, with and without reusing its KV cache."""
    rows = [r for r in section.ok("prefix_cache") if r.get("ttft_ms") is not None]
    if not rows:
        return False
    _bars(path, [f"{'transformers' if r['runtime'] == 'hf' else 'llama.cpp'} {r['mode']}" for r in rows],
          [r["ttft_ms"] for r in rows],  # type: ignore[misc]
          ["tab:gray" if r["mode"] in ("none", "recompute") else "tab:green" for r in rows], "{:,.1f} ms",
          "time to first token, ms (median; grey: no prompt cache)", f"Prompt caching — {section.title}", log=True)
    return True


def draw_all(section: Section, front: list[dict[str, Any]], with_quality: bool, objective: str,
             folder: Path, recommended: str | None = None) -> list[tuple[str, Path]]:
    """Every figure this section has data for: (caption, path)."""
    out = []
    for caption, name, fn in (
        ("Throughput against batch size / threads", "throughput", lambda p: throughput(section, p)),
        ("Peak memory per precision", "memory", lambda p: memory(section, p)),
        ("Quality against speed, Pareto frontier circled" if with_quality else
         "Memory against speed, Pareto frontier circled", "frontier",
         lambda p: quality_vs_speed(section, front, with_quality, objective, p, recommended)),
        ("Time to first token with and without prompt caching", "prompt-cache", lambda p: prompt_cache(section, p)),
    ):
        path = folder / f"{section.slug}--{name}.png"
        try:
            if fn(path):
                out.append((caption, path))
        except Exception as e:  # a figure that cannot be drawn must not cost the report
            log.warning("figure %s for %s not drawn: %s", name, section.title, e)
    return out
