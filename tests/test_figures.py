"""The report's figures read back as matplotlib objects: every axis holds every point it draws, a log axis starts
above 0, no axis stands on one value, and no two tick labels overlap."""

from __future__ import annotations

import itertools

import numpy as np

from inferlab.report import figures, frontier
from inferlab.report.table import collect

from .test_report import bench, score


def _drawn(ax) -> list[tuple[float, float]]:
    """Every data point an axes draws: line vertices, scatter offsets, the ends of bars."""
    pts = [tuple(p) for line in ax.get_lines() for p in line.get_xydata()
           if not (line.get_linestyle() == "--" and len(line.get_xydata()) == 2)]  # not a separating line
    pts += [tuple(p) for c in ax.collections for p in np.asarray(c.get_offsets())]
    for bar in ax.patches:
        x, y, w, h = bar.get_x(), bar.get_y(), bar.get_width(), bar.get_height()
        pts += [(x + w, y), (x + w, y + h)]
    return pts


def _overlapping(labels) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def check_axes(ax) -> None:
    x0, x1 = sorted(ax.get_xlim())
    y0, y1 = sorted(ax.get_ylim())
    for scale, low in ((ax.get_xscale(), x0), (ax.get_yscale(), y0)):
        assert scale != "log" or low > 0, f"{ax.get_title()}: a log axis from {low}"
    assert x1 > x0 and y1 > y0
    for x, y in _drawn(ax):
        assert x0 <= x <= x1 and y0 <= y <= y1, f"{ax.get_title()}: ({x}, {y}) outside {x0}..{x1} × {y0}..{y1}"
    assert ax.patches or len({x for x, _ in _drawn(ax)}) > 1, f"{ax.get_title()}: points on a one-value axis"
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        shown = [t for t in labels if t.get_visible() and t.get_text()]
        assert len(shown) >= 2, f"{ax.get_title()}: an axis labelled at {[t.get_text() for t in shown]} only"
    assert not _overlapping(ax.get_xticklabels()), _overlapping(ax.get_xticklabels())
    assert not _overlapping(ax.get_yticklabels()), _overlapping(ax.get_yticklabels())
    box = ax.get_window_extent()
    for t in ax.texts:  # each bar's value, written beside it
        e = t.get_window_extent()
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1, f"{t.get_text()} is cut off"


def test_every_figure_holds_its_points_on_readable_axes(tmp_path):
    r = tmp_path / "results"
    #                 name      precision batch tok/s TTFT ITL90 GiB
    for name, precision, batch, tps, mem in (("fp32-b1", "fp32", 1, 16, 0.9), ("fp32-b4", "fp32", 4, 31, 1.0),
                                             ("bf16-b1", "bf16", 1, 12, 0.6), ("nf4-b1", "nf4", 1, 7, 0.4)):
        bench(r, "cpu", name, precision, batch, tps, 900, 60, mem, stage="bench_cpu")
    for quant, tps, mem in (("f16", 66, 0.4), ("q8_0", 101, 0.3), ("q4_0", 140, 0.2), ("q2_k", 135, 0.2)):
        bench(r, "cpu", f"{quant}-t2", None, 1, tps, 80, 12, mem, stage="bench_cpu", runtime="llama_cpp",
              quant=quant, n_threads=2, api="generate", kv_type="f16", flash_attn=False, n_batch=512)
    for mode, ttft in (("none", 28.5), ("context", 24.9)):  # close values: a log axis would label 2.5×10¹ ...
        bench(r, "cpu", f"cache-{mode}", None, 1, 1, ttft, 1, 0.3, stage="bench_cpu", scenario="prefix_cache",
              runtime="llama_cpp", mode=mode)
    #                 KL from fp32: 0 (itself), then three decades apart
    for precision, kl in (("fp32", 0.0), ("bf16", 0.00091), ("nf4", 0.24)):
        score(r, "cpu", precision, kl, device="cpu")
    (section,) = collect(r)
    front, with_quality = frontier.frontier(section.candidates, "total_tps")
    assert with_quality
    made = {}
    for _, name, make in figures.figures(section, front, with_quality, "total_tps", front[0]["name"]):
        fig = make()
        assert fig is not None, name
        fig.canvas.draw()
        for ax in fig.axes:
            check_axes(ax)
        made[name] = fig

    (ax,) = made["frontier"].axes
    assert ax.get_yscale() == "log"  # KL spans decades: log from the smallest positive value, none below 0
    low, high = sorted(ax.get_ylim())
    assert low < 0.00091 and high > 0.24 and ax.yaxis_inverted()  # better quality up
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels[0] == "0 (reference)" and "0.001" in labels and "0.1" in labels
    ys = sorted(y for c in ax.collections for _, y in np.asarray(c.get_offsets()))
    assert ys[0] < 0.00091 / 10  # fp32 (KL 0) drawn on the reference line, above the data
    hf, llama = made["throughput"].axes
    assert len(hf.get_lines()) == 3 and not hf.patches  # batch 1 and 4: lines
    assert len(llama.patches) == 4 and not llama.get_lines()  # one thread count: bars, one per quant
    assert "2 threads" in llama.get_title()
    (cache,) = made["prompt-cache"].axes
    assert cache.get_xscale() == "linear" and cache.get_xlim()[0] == 0  # 24.9 vs 28.5: bars from 0
