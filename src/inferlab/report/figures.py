"""The report's figures (PNG, matplotlib) per hardware and model, from the rows of its tables."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferlab.report.comparisons import kind as _kind
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


LOG_SPAN = 20.0  # values spanning more than this factor go on a log axis; less, linear from 0


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _runtime(r: dict[str, Any]) -> str:
    return "transformers" if r["runtime"] == "hf" else "llama.cpp"


def _series(r: dict[str, Any]) -> str:
    """A point's colour in the quality figure: its precision, or llama.cpp and its quant."""
    return f"{'llama.cpp ' if r['runtime'] == 'llama_cpp' else ''}{_kind(r)}"


def _spans(values: list[float]) -> bool:
    """Whether positive values span enough to need a log axis."""
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > LOG_SPAN


def _plain_log(axis, low: float, high: float) -> None:
    """A log axis labelled in plain numbers (10, 100, 1,000), minor ticks unlabelled; less than two
    decades wide, labelled at 1, 2 and 5 of each decade too."""
    ticker = matplotlib_ticker()
    if high / low < 100:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.10g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _hbars(ax, labels: list[str], values: list[float], colors: Any, text: str, xlabel: str
           ) -> None:
    """Horizontal bars in the given order, each value beside its bar; a log axis where the values
    span decades, else linear from 0."""
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels)
    for i, v in enumerate(values):
        ax.text(v, i, " " + text.format(v), va="center", fontsize=8)
    if _spans(values):
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 4)
        _plain_log(ax.xaxis, min(values) / 2, max(values) * 4)  # room for the longest bar's value
    else:
        ax.set_xlim(0, max(values) * 1.3)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()


def throughput(section: Section):
    """Total tokens/s against batch per precision (transformers), decode tokens/s against threads
    per quant (llama.cpp); bars where the axis would hold one value."""
    cands = section.candidates
    hf = [r for r in cands if r["runtime"] == "hf" and (plain_hf(r) or r.get("compile") is True)]
    grid = llama_grid(cands)
    llama = [r for r in cands if plain_llama(r, None, grid)]
    panels = [p for p in (("hf", hf), ("llama", llama)) if p[1]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if kind == "hf":
                label = _kind(r) + (" static+compile" if r.get("compile") is True else "")
                if r.get("decode") not in ("", None, "generate"):
                    label += f" {r['decode']} loop"
                mode = r.get("compile_mode")
                if mode not in ("", None, "reduce-overhead") and r.get("compile") is True:
                    label += f" {r['compile_mode']}"
                series.setdefault(label, []).append((r["batch_size"], r["total_tps"]))
            else:
                series.setdefault(_kind(r), []).append((r["n_threads"], r["decode_tps"]))
        xs = sorted({x for pts in series.values() for x, _ in pts})
        ylabel = "total tokens/s (all sequences)" if kind == "hf" else "decode tokens/s"
        runtime = "transformers" if kind == "hf" else "llama.cpp"
        if len(xs) == 1:  # one batch size or thread count: a line would sit on a one-value axis
            what = f"batch {xs[0]}" if kind == "hf" else f"{xs[0]} threads"
            ordered = sorted(((y, label) for label, pts in series.items() for _, y in pts),
                             reverse=True)
            _hbars(ax, [label for _, label in ordered], [y for y, _ in ordered], "tab:blue",
                   "{:,.1f}", ylabel)
            ax.set_title(f"{runtime}: {ylabel} at {what}")
            ax.grid(True, axis="x", alpha=0.3)
            continue
        ys = [y for pts in series.values() for _, y in pts]
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if kind == "hf":  # batch sizes double: a log axis, each size a tick
            ax.set_xscale("log", base=2)
            ax.set_xlim(xs[0] / 1.25, xs[-1] * 1.25)
        else:
            ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
        if _spans(ys):
            ax.set_yscale("log")
            ax.set_ylim(min(ys) / 1.5, max(ys) * 1.5)
            _plain_log(ax.yaxis, min(ys) / 1.5, max(ys) * 1.5)
        else:
            ax.set_ylim(0, max(ys) * 1.15)
        ax.set_xlabel("batch size (sequences)" if kind == "hf" else "threads")
        ax.set_ylabel(ylabel)
        what = "throughput vs batch" if kind == "hf" else "decode speed vs threads"
        ax.set_title(f"{runtime}: {what}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(section.title, fontsize=10)
    return fig


def _bars(labels: list[str], values: list[float], colors: Any, text: str, xlabel: str, title: str):
    """A horizontal bar chart in the given order, each value beside its bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.48 * len(labels) + 1.4))
    _hbars(ax, labels, values, colors, text, xlabel)
    ax.set_title(title, fontsize=10)
    return fig


def memory(section: Section):
    """Peak memory per precision / quant, one sequence."""
    cands = section.candidates
    threads = max((r.get("n_threads") or 0 for r in cands if r["runtime"] == "llama_cpp"),
                  default=None)
    grid = llama_grid(cands)
    bars = [r for r in cands if r.get("memory_gib") is not None
            and ((plain_hf(r) and r.get("batch_size") == 1) or plain_llama(r, threads, grid))]
    if not bars:
        return None
    kinds = ", ".join(sorted({r["memory_kind"] for r in bars}))
    return _bars([f"{_runtime(r)} {_kind(r)}" for r in bars],
                 [r["memory_gib"] for r in bars], "tab:blue", "{:.2f}",  # type: ignore[misc]
                 f"peak memory, GiB ({kinds}), batch 1",
                 f"Peak memory per precision — {section.title}")


def kl_axis(ax, values: list[float]) -> float:
    """KL on a log axis from the smallest positive value, better quality up; a configuration at
    exactly 0 (a reference against itself) sits on a line a decade below the data, labelled 0.
    Returns where 0 is drawn."""
    pos = [v for v in values if v > 0]
    low = math.floor(math.log10(min(pos))) if pos else -4
    high = math.log10(max(pos)) if pos else low + 1
    zero = 10.0 ** (low - 1)
    ax.set_yscale("log")
    ax.set_ylim(10 ** (high + 0.25), zero / 10 ** 0.3)  # inverted: the largest KL at the bottom
    ticks = [10.0 ** e for e in range(low, math.ceil(high) + 1) if e <= high + 0.25]
    ticker = matplotlib_ticker()
    ax.yaxis.set_major_locator(ticker.FixedLocator([zero, *ticks]))
    label = ticker.FuncFormatter(lambda v, _: "0 (reference)" if v == zero else f"{v:g}")
    ax.yaxis.set_major_formatter(label)
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=tuple(range(2, 10))))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if any(v == 0 for v in values):
        ax.axhline(zero * 10 ** 0.5, color="0.6", linewidth=0.8, linestyle="--")
    return zero


def quality_vs_speed(section: Section, front: list[dict[str, Any]], with_quality: bool,
                     objective: str,
                     recommended: str | None = None):
    """Quality (or memory, where quality was not measured) against speed: one colour per precision
    / quant, marker area by memory, the Pareto frontier ringed, the recommendation starred."""
    y_key = "quality" if with_quality else "memory_gib"
    pts = [r for r in section.candidates
           if r.get(objective) is not None and r.get(y_key) is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    kl = with_quality and section.quality_metric == "kl_mean"
    zero = kl_axis(ax, [r[y_key] for r in pts]) if kl else None

    def y(r: dict[str, Any]) -> float:
        return zero if zero is not None and r[y_key] <= 0 else r[y_key]

    kinds = sorted({_series(r) for r in pts})
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    mem_max = max(r.get("memory_gib") or 0 for r in pts) or 1
    for i, k in enumerate(kinds):
        rows = [r for r in pts if _series(r) == k]
        ax.scatter([r[objective] for r in rows], [y(r) for r in rows], color=cmap(i % cmap.N),
                   s=[20 + 140 * (r.get("memory_gib") or 0) / mem_max for r in rows], alpha=0.8,
                   label=k, zorder=2)
    names = {r["name"] for r in front}
    fr = [r for r in pts if r["name"] in names]
    if fr:
        ax.scatter([r[objective] for r in fr], [y(r) for r in fr], s=170, facecolors="none",
                   edgecolors="tab:red", linewidths=1.3, zorder=3, label="Pareto frontier")
    rec = next((r for r in pts if r["name"] == recommended), None)
    if rec is not None:
        ax.scatter([rec[objective]], [y(rec)], marker="*", s=260, color="black", zorder=4,
                   label="recommended")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    xs = [r[objective] for r in pts]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)
    _plain_log(ax.xaxis, min(xs) / 1.4, max(xs) * 1.4)
    ax.set_xlabel(axis_label(objective) + " (marker area: peak memory)")
    ax.set_ylabel(axis_label(section.quality_metric) if with_quality else "peak memory, GiB")
    if not kl:  # a linear axis with room around the markers
        ys = [r[y_key] for r in pts]
        pad = (max(ys) - min(ys)) * 0.1 or abs(max(ys)) * 0.1 or 1.0
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    title = "Quality vs speed" if with_quality else "Memory vs speed (quality not measured here)"
    if with_quality and section.weights != "real":
        title += " — random weights: quality figures measure numerics only"
    starred = f"\nrecommended (★): {rec['config']}" if rec is not None else ""
    ax.set_title(f"{title}\n{section.title}{starred}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def prompt_cache(section: Section):
    """TTFT of requests sharing a long prefix, with and without reusing its KV cache."""
    rows = [r for r in section.ok("prefix_cache") if r.get("ttft_ms") is not None]
    if not rows:
        return None
    return _bars([f"{_runtime(r)} {r['mode']}" for r in rows],
                 [r["ttft_ms"] for r in rows],  # type: ignore[misc]
                 ["tab:gray" if r["mode"] in ("none", "recompute") else "tab:green" for r in rows],
                 "{:,.1f} ms", "time to first token, ms (median; grey: no prompt cache)",
                 f"Prompt caching — {section.title}")


def figures(section: Section, front: list[dict[str, Any]], with_quality: bool, objective: str,
            recommended: str | None = None) -> list[tuple[str, str, Callable[[], Any]]]:
    """(caption, file name part, a function making the figure or None) per figure of a section."""
    return [
        ("Throughput against batch size / threads", "throughput", lambda: throughput(section)),
        ("Peak memory per precision", "memory", lambda: memory(section)),
        ("Quality against speed, Pareto frontier circled" if with_quality else
         "Memory against speed, Pareto frontier circled", "frontier",
         lambda: quality_vs_speed(section, front, with_quality, objective, recommended)),
        ("Time to first token with and without prompt caching", "prompt-cache",
         lambda: prompt_cache(section)),
    ]


def draw_all(section: Section, front: list[dict[str, Any]], with_quality: bool, objective: str,
             folder: Path, recommended: str | None = None) -> list[tuple[str, Path]]:
    """Every figure this section has data for, saved: (caption, path)."""
    out = []
    for caption, name, make in figures(section, front, with_quality, objective, recommended):
        path = folder / f"{section.slug}--{name}.png"
        try:
            fig = make()
            if fig is not None:
                _save(fig, path)
                _plt().close(fig)
                out.append((caption, path))
        except Exception as e:  # a figure that cannot be drawn must not cost the report
            log.warning("figure %s for %s not drawn: %s", name, section.title, e)
    return out
