"""Open-loop load: requests arrive at a set rate, finished or not, as users do.

Arrivals follow `vllm bench serve`: inter-arrival times drawn from a gamma distribution with
shape `burstiness` and mean 1/rate (burstiness 1: a Poisson process; below 1 burstier, above 1
more regular; inf: evenly spaced), rescaled so that n requests span exactly n/rate seconds (vLLM
does the same, to compare seeds fairly). Prompt lengths are drawn from a distribution (fixed,
uniform or lognormal around a mean), not all alike.

A request is *good* when it meets every latency target set (TTFT, its mean inter-token latency,
end-to-end); a rate *holds* when at least `attainment` of its requests are good (DistServe's SLO
attainment; a failed request is never good); goodput is good requests per second (vLLM's
`--goodput`). The saturation point is the highest rate tried that holds: GuideLLM's sweep and
inference-benchmarker find the same knee by stepping the rate up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send times (s from the start, the first at 0) of n requests at `rate` requests/s."""
    if n <= 0:
        return []
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    if n > 1 and times[-1] > 0:
        times *= ((n - 1) / rate) / times[-1]  # the n requests span exactly (n-1)/rate seconds
    return [float(t) for t in times]


def prompt_lengths(n: int, mean: int, dist: str, spread: float, low: int, high: int,
                   rng: np.random.Generator) -> list[int]:
    """n prompt lengths in tokens, clipped to [low, high].

    Fixed, uniform in mean·[1-spread, 1+spread], or lognormal with median mean and shape spread
    (a long right tail, like real chat prompts)."""
    if dist == "fixed":
        xs = np.full(n, float(mean))
    elif dist == "uniform":
        xs = rng.uniform(mean * (1 - spread), mean * (1 + spread), size=n)
    elif dist == "lognormal":
        xs = rng.lognormal(math.log(mean), spread, size=n)
    else:
        raise ValueError(f"prompt length distribution {dist!r}; allowed: fixed, uniform, "
                         "lognormal")
    return [int(min(max(round(x), low), high)) for x in xs]


def tpot_s(r: dict[str, Any]) -> float | None:
    """A request's mean time per output token after the first (vLLM's TPOT); None if under 2."""
    if r.get("ttft_s") is None or r.get("tokens", 0) < 2:
        return None
    return (r["e2e_s"] - r["ttft_s"]) / (r["tokens"] - 1)


def is_good(r: dict[str, Any], slo: dict[str, float | None]) -> bool:
    """Did this request meet every target set (milliseconds; None: not judged)?"""
    if not r.get("ok"):
        return False
    checks = (("ttft_ms", r.get("ttft_s")), ("itl_ms", tpot_s(r)), ("e2e_ms", r.get("e2e_s")))
    for key, value in checks:
        target = slo.get(key)
        if target is None:
            continue
        if key == "itl_ms" and value is None:  # one token: no inter-token latency to judge
            continue
        if value is None or value * 1000 > target:
            return False
    return True


def goodput(results: list[dict[str, Any]], slo: dict[str, float | None], window_s: float,
            attainment: float) -> dict[str, Any]:
    good = sum(is_good(r, slo) for r in results)
    share = good / len(results) if results else 0.0
    return {"good_requests": good, "slo_attainment": share,
            "goodput": good / window_s if window_s > 0 else 0.0,
            "meets_slo": bool(results) and share >= attainment, "slo": dict(slo),
            "attainment_target": attainment}


def saturation(points: list[dict[str, Any]]) -> dict[str, Any]:
    """From rate points ({"rate", "meets_slo", "goodput", ...}): the highest rate that holds.

    Also whether a lower one failed (a noisy knee) or the highest rate tried still held (the true
    point lies beyond it)."""
    pts = sorted((p for p in points if p.get("rate") not in (None, "")),
                 key=lambda p: float(p["rate"]))
    held = [p for p in pts if p.get("meets_slo")]
    if not pts:
        return {"saturation_rate": None, "note": "no rate was measured"}
    if not held:
        return {"saturation_rate": None,
                "note": f"no rate held the targets (lowest tried: {pts[0]['rate']:.3g} req/s)"}
    best = held[-1]
    if best is pts[-1]:
        note = "the highest rate tried still held: saturation is at least this"
    else:
        after = pts[pts.index(best) + 1]["rate"]
        note = f"the next rate tried ({after:.3g} req/s) missed the targets"
    if any(not p.get("meets_slo") for p in pts[:pts.index(best)]):
        note += "; a lower rate missed them (noisy: more requests per rate would settle it)"
    return {"saturation_rate": float(best["rate"]), "goodput": best.get("goodput"), "note": note}


def latency_figure(series: dict[str, list[dict[str, Any]]], slo: dict[str, float | None],
                   path: Path) -> bool:
    """TTFT, inter-token and end-to-end latency (p50 and p90) against the offered request rate,
    one line per served configuration, targets as dashed lines, each saturation point marked.
    False if nothing to draw."""
    series = {k: sorted(v, key=lambda p: p["rate"]) for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("ttft_ms", "TTFT"), ("itl_ms", "inter-token latency"),
              ("e2e_ms", "end-to-end latency"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for i, (name, pts) in enumerate(series.items()):
            color = f"C{i}"
            rates = [p["rate"] for p in pts]
            ax.plot(rates, [p[key]["p50"] for p in pts], "o-", color=color, label=f"{name} p50")
            ax.plot(rates, [p[key]["p90"] for p in pts], "s--", color=color, alpha=0.6,
                    label=f"{name} p90")
            sat = saturation(pts)["saturation_rate"]
            if sat is not None:
                ax.axvline(sat, color=color, linestyle=":", alpha=0.8)
        if slo.get(key) is not None:
            ax.axhline(slo[key], color="red", linestyle="--", linewidth=1,
                       label=f"target {slo[key]:g} ms")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title + (" (per-request mean)" if key == "itl_ms" else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("latency against request rate (dotted: saturation point, the highest rate "
                 "meeting the targets)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
