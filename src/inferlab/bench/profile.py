"""Kernel-level profile of decode steps: where a token's time goes.

torch.profiler records the kernels of one request's decode steps, after the point's warm-up.
Per generated token:
- kernel time: the union of the intervals in which a kernel (or copy / memset) ran;
- launch gaps: idle stretches shorter than GAP_HOST_US (also inside a CUDA graph);
- host waits: longer idle stretches, the GPU waiting for the host to issue work;
- the kernels: how many, how long, which kinds, and the weights' read rate.
The decode loops' profile starts after the prefill; generate()'s covers the whole request. On
the CPU the figures are over torch's top-level operators: their gaps are the host's Python.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from inferlab.bench.kernel_kinds import kind
from inferlab.bench.workload import prompts
from inferlab.config import DECODE_LOOPS

log = logging.getLogger(__name__)

GAP_HOST_US = 10.0  # an idle stretch this long or longer is counted as waiting for the host
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
def device_intervals(trace: dict[str, Any], cuda: bool) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of what the device ran: kernels, copies and memsets on CUDA.

    On the CPU the top-level operators (none other of their thread contains them)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if cuda:
        out = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in events
               if e.get("cat") in DEVICE_CATS]
        return sorted(out)
    ops = sorted(((float(e["ts"]), -float(e["dur"]), str(e.get("tid")), e["name"]) for e in events
                  if e.get("cat") == "cpu_op"), key=lambda x: (x[2], x[0], x[1]))
    top: list[tuple[float, float, str]] = []
    ends: dict[str, float] = {}
    for ts, neg, tid, name in ops:  # one starting inside the previous top-level one is nested
        if ts >= ends.get(tid, float("-inf")):
            top.append((ts, ts - neg, name))
            ends[tid] = ts - neg
    return sorted(top)


def summarize_timeline(intervals: list[tuple[float, float, str]], steps: int,
                       weight_bytes: int | None = None) -> dict[str, Any]:
    """Per-step figures of a device timeline (see the module docstring)."""
    if not intervals or steps < 1:
        raise RuntimeError("the profile holds no device activity")
    span_start, span_end = intervals[0][0], max(e for _, e, _ in intervals)
    busy = launch = host = 0.0
    n_launch = n_host = 0
    cur_s, cur_e = intervals[0][0], intervals[0][1]
    for s, e, _ in intervals[1:]:
        if s > cur_e:  # an idle stretch
            busy += cur_e - cur_s
            gap = s - cur_e
            if gap < GAP_HOST_US:
                launch, n_launch = launch + gap, n_launch + 1
            else:
                host, n_host = host + gap, n_host + 1
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    by_name: dict[str, list[float]] = {}
    by_kind: dict[str, float] = {}
    for s, e, name in intervals:
        by_name.setdefault(name, []).append(e - s)
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + (e - s)
    durations = sorted(e - s for s, e, _ in intervals)
    ms = 1e-3 / steps  # microseconds in the whole profile -> milliseconds per step
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    out: dict[str, Any] = {
        "steps": steps,
        "span_ms_per_step": round((span_end - span_start) * ms, 4),
        "kernel_ms_per_step": round(busy * ms, 4),
        "launch_gap_ms_per_step": round(launch * ms, 4),
        "host_wait_ms_per_step": round(host * ms, 4),
        "kernel_fraction": (
            round(busy / (span_end - span_start), 4) if span_end > span_start else None
        ),
        "kernels_per_step": round(len(intervals) / steps, 2),
        "launch_gaps_per_step": round(n_launch / steps, 2),
        "host_waits_per_step": round(n_host / steps, 2),
        "kernel_us_median": round(durations[len(durations) // 2], 3),
        "kernels_under_5us_per_step": round(sum(1 for d in durations if d < 5.0) / steps, 2),
        "ms_per_step_by_kind": {
            k: round(v * ms, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {"name": n[:160], "kind": kind(n), "ms_per_step": round(sum(d) * ms, 4),
             "calls_per_step": round(len(d) / steps, 2),
             "us_median": round(sorted(d)[len(d) // 2], 3)}
            for n, d in top
        ],
        "gap_host_us": GAP_HOST_US,
    }
    if weight_bytes:
        matmul_ms = by_kind.get("matmul", 0.0) * ms
        # every weight is read once per step: the rate the matrix kernels read them at
        def gbps(ms_per_step: float) -> float | None:
            return round(weight_bytes / (ms_per_step * 1e-3) / 1e9, 1) if ms_per_step else None

        out["weight_gbps_over_kernels"] = gbps(busy * ms) if busy else None
        out["weight_gbps_over_matmul"] = gbps(matmul_ms)
    return out


def decode_profile(backend, folder: Path, point: dict[str, Any],
                   name: str) -> tuple[dict[str, Any], dict]:
    """Warm the point up as the latency scenario does, then profile one more request."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = backend.device.type == "cuda"
    batch, new_tokens = point.get("batch_size", 1), point["new_tokens"]
    n = 2 + point.get("warmup", 1)
    ps = prompts(backend.tokenize, folder, point["prompt_tokens"], n * batch)
    batches = [ps[i * batch:(i + 1) * batch] for i in range(n)]
    t0 = time.perf_counter()
    for b in batches[:-1]:  # the cold request compiles and captures; the rest warm up
        backend.request(b, new_tokens)
    warm_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities):  # the profiler's start-up (CUPTI) here, not in the steps
        torch.ones(1, device=backend.device).add_(1)
        backend.sync()
    prof = profile(activities=activities)
    loop = point.get("decode") in DECODE_LOOPS
    started = []

    def start() -> None:
        backend.sync()  # the prefill finishes outside the profile
        prof.start()
        started.append(True)

    if loop:
        backend.after_prefill = start
    else:
        prof.start()
    try:
        t = backend.request(batches[-1], new_tokens)
        backend.sync()
    finally:
        backend.after_prefill = None
        prof.stop()
    if loop and not started:
        raise RuntimeError("the decode loop never reported its prefill; nothing was profiled")
    steps = new_tokens - 1 if loop else new_tokens
    tmp = Path(tempfile.mkdtemp(prefix="inferlab-profile-"))
    try:
        path = tmp / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        trace_dir = backend.settings.get("trace_dir")
        if trace_dir:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            kept = Path(trace_dir) / f"{name}.json.gz"
            with path.open("rb") as src, gzip.open(kept.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            kept.with_suffix(".part").rename(kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from inferlab.backends.hf import stored_bytes

    weight_bytes = stored_bytes(backend.model)
    metrics = summarize_timeline(device_intervals(trace, cuda), steps, weight_bytes)
    metrics["weight_bytes_method"] = "storage"
    itl = t.itl
    metrics.update(
        window="decode steps" if loop else "whole request (prefill included)",
        device_timeline="CUDA kernels" if cuda else "CPU top-level operators",
        profiled_step_ms=round(1e3 * sum(itl) / len(itl), 4) if itl else None,  # profiled
        warmup_s=round(warm_s, 3), prompt_tokens=point["prompt_tokens"], new_tokens=new_tokens,
        batch=batch,
    )
    log.info("%s: %.3f ms kernels + %.3f ms launch gaps + %.3f ms host waits per step; "
             "%.0f kernels per step",
             name, metrics["kernel_ms_per_step"], metrics["launch_gap_ms_per_step"],
             metrics["host_wait_ms_per_step"], metrics["kernels_per_step"])
    return metrics, {}
