"""Batch-1 matrix-vector kernels on Phi-2's projection shapes: which kernel reads the weights fastest on this GPU.

    python scripts/gemv_bench.py OUT.json [--hidden 2560 --inter 10240 --vocab 51200 --layers 32]

A decode step at batch 1 reads every weight once, so its matrix kernels are bound by memory bandwidth; this measures,
for each shape a Phi-2 layer multiplies by (and the fused shapes of backends/fuse.py), the time per call and the rate
the weights are read at, for: cuBLAS (`F.linear`, what transformers runs), inductor's matrix-vector decomposition
(`torch.mm` at M=1 under coordinate-descent tuning becomes a Triton reduction), a plain Triton GEMV over a grid of
block sizes, torchao's int4 (tinygemm) and int8 weight-only kernels, and GemLite's 4- and 8-bit GEMV kernels where
`gemlite` is installed. Each figure is the median over 20 replays of one CUDA graph that calls the kernel once for
each of several copies of the weights (more bytes than the L2 cache holds, so every call reads from HBM), divided
by the number of calls; launch gaps inside the graph are counted, as they are in a decode step. The device's copy
and read bandwidth are measured the same way, for reference. Writes OUT.json after each section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

L2_DEFEAT_BYTES = 512 * 2**20


def graph_time_us(calls, reps=20):
    """Median, min and max microseconds per call of `calls` (zero-argument callables) replayed as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del graph
    return {"us": round(statistics.median(times), 3), "us_min": round(min(times), 3), "us_max": round(max(times), 3)}


def copies_for(nbytes):
    return max(2, -(-L2_DEFEAT_BYTES // nbytes))


def triton_gemv():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, b_ptr, y_ptr, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + rk).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty))

    def run(x, w, b, y, block_n, block_k, warps, stages):
        n, k = w.shape
        gemv[(n // block_n,)](x, w, b, y, k, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=b is not None,
                              num_warps=warps, num_stages=stages)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--inter", type=int, default=10240)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    a = p.parse_args()
    h, i = a.hidden, a.inter
    shapes = {"qkv": (3 * h, h), "dense": (h, h), "fc1": (i, h), "fc2": (h, i), "qkv+fc1": (3 * h + i, h),
              "dense+fc2": (h, h + i), "lm_head": (a.vocab, h)}
    per_token = {"unfused": {"qkv": a.layers, "dense": a.layers, "fc1": a.layers, "fc2": a.layers, "lm_head": 1},
                 "parallel-block fused": {"qkv+fc1": a.layers, "dense+fc2": a.layers, "lm_head": 1}}
    skip = set(filter(None, a.skip.split(",")))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": shapes,
              "per_token": per_token, "bandwidth": {}, "kernels": {}}

    def save():
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        import os

        os.replace(a.out + ".tmp", a.out)

    def record(method, shape, timing, weight_bytes, **extra):
        timing["GB_per_s"] = round(weight_bytes / timing["us"] / 1e3, 1)
        result["kernels"].setdefault(method, {})[shape] = {**timing, "weight_bytes": weight_bytes, **extra}
        print(f"{method:28s} {shape:10s} {timing['us']:8.2f} us {timing['GB_per_s']:7.0f} GB/s {extra or ''}",
              flush=True)
        save()

    def attempt(name, fn):
        if name in skip:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a kernel this machine cannot run is reported and the rest goes on
            traceback.print_exc()
            result.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"[:500]
            save()
        print(f"-- {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    dev = "cuda"
    for limit in ("cache_size_limit", "recompile_limit"):  # one compiled graph per shape and kernel family
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)

    def bandwidth():
        n = 1 << 29  # 1 GiB of fp16
        src, dst = torch.empty(n, dtype=torch.float16, device=dev), torch.empty(n, dtype=torch.float16, device=dev)
        t = graph_time_us([lambda: dst.copy_(src)], reps=10)
        result["bandwidth"]["copy_GB_per_s"] = round(2 * src.numel() * 2 / t["us"] / 1e3, 1)  # read + write
        out = torch.empty((), dtype=torch.float32, device=dev)
        t = graph_time_us([lambda: torch.sum(src, dim=0, dtype=torch.float32, out=out)], reps=10)
        result["bandwidth"]["read_GB_per_s"] = round(src.numel() * 2 / t["us"] / 1e3, 1)
        print("bandwidth", result["bandwidth"], flush=True)
        save()

    def weights(shape, dtype, bias=True):
        n, k = shape
        c = copies_for(n * k * 2)
        ws = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(c)]
        bs = [torch.randn(n, dtype=dtype, device=dev) * 0.02 for _ in range(c)] if bias else [None] * c
        return ws, bs

    def cublas():
        for name, shape in shapes.items():
            ws, bs = weights(shape, torch.float16)
            x = torch.randn(1, 1, shape[1], dtype=torch.float16, device=dev)
            record("cublas F.linear fp16", name, graph_time_us([lambda w=w, b=b, x=x: F.linear(x, w, b)
                                                                for w, b in zip(ws, bs)]), shape[0] * shape[1] * 2)
            del ws, bs

    def inductor_mv():
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True
        torch._dynamo.reset()

        @torch.compile(dynamic=False)
        def mv(x, w, b):
            return torch.mm(x, w.t()) + b

        for name, shape in shapes.items():
            ws, bs = weights(shape, torch.float16)
            x = torch.randn(1, shape[1], dtype=torch.float16, device=dev)
            ref = F.linear(x, ws[0], bs[0])
            got = mv(x, ws[0], bs[0])
            err = float((got.float() - ref.float()).abs().max())
            record("inductor mv (cdt) fp16", name, graph_time_us([lambda w=w, b=b, x=x: mv(x, w, b)
                                                                  for w, b in zip(ws, bs)]),
                   shape[0] * shape[1] * 2, max_abs_err=round(err, 5))
            del ws, bs
        ic.coordinate_descent_tuning = False

    def triton_sweep():
        run = triton_gemv()
        configs = [(bn, bk, w, s) for bn in (1, 2, 4, 8) for bk in (256, 512, 1024) for w in (2, 4, 8)
                   for s in (1, 3) if bn * bk >= 32 * w * 8]
        for name, shape in shapes.items():
            ws, bs = weights(shape, torch.float16)
            x = torch.randn(1, shape[1], dtype=torch.float16, device=dev)
            y = torch.empty(1, shape[0], dtype=torch.float16, device=dev)
            ref = F.linear(x, ws[0], bs[0])
            best = None
            for cfg in configs:
                if shape[1] % cfg[1]:
                    continue
                try:
                    run(x, ws[0], bs[0], y, *cfg)
                    err = float((y.float() - ref.float()).abs().max())
                    t = graph_time_us([lambda w=w, b=b, x=x, y=y, cfg=cfg: run(x, w, b, y, *cfg)
                                       for w, b in zip(ws, bs)], reps=10)
                except Exception as e:  # a config Triton cannot compile
                    print("config", cfg, type(e).__name__, str(e)[:120])
                    continue
                if best is None or t["us"] < best[0]["us"]:
                    best = (t, cfg, err)
            t, cfg, err = best
            t = graph_time_us([lambda w=w, b=b, x=x, y=y, cfg=cfg: run(x, w, b, y, *cfg) for w, b in zip(ws, bs)])
            record("triton gemv fp16 (best block)", name, t, shape[0] * shape[1] * 2,
                   config=dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), cfg)), max_abs_err=round(err, 5))
            del ws, bs

    def torchao_int(bits):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        for name, shape in shapes.items():
            n, k = shape
            c = copies_for(n * k // (2 if bits == 4 else 1))
            layers = []
            for _ in range(c):
                lin = torch.nn.Linear(k, n, bias=True, dtype=torch.bfloat16, device=dev)
                if bits == 4:
                    quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
                else:
                    quantize_(lin, Int8WeightOnlyConfig())
                layers.append(lin)
            x = torch.randn(1, 1, k, dtype=torch.bfloat16, device=dev)
            fn = torch.compile(lambda x, w, b: F.linear(x, w, b), dynamic=False)  # weights as arguments: one graph
            packed = n * k // 2 + 2 * (n * k // 128) * 2 if bits == 4 else n * k + n * 2
            record(f"torchao int{bits} weight-only (compiled)", name,
                   graph_time_us([lambda lin=lin, x=x, fn=fn: fn(x, lin.weight, lin.bias) for lin in layers]), packed)
            del layers

    def gemlite(bits):
        import gemlite
        from gemlite.helper import A16W4_HQQ_INT, A16W8_INT8

        for name, shape in shapes.items():
            n, k = shape
            c = copies_for(n * k // (2 if bits == 4 else 1))
            layers = []
            for _ in range(c):
                w = torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02
                b = torch.randn(n, dtype=torch.float16, device=dev) * 0.02
                if bits == 4:  # asymmetric, groups of 128 along the input: W ~ (W_q - zeros) * scales (HQQ's layout)
                    g = w.view(n, k // 128, 128)
                    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                    scales = ((hi - lo) / 15).clamp(min=1e-6)
                    zeros = -lo / scales
                    wq = torch.clamp(torch.round(g / scales + zeros), 0, 15).to(torch.uint8).view(n, k)
                    layers.append(A16W4_HQQ_INT(device=dev, dtype=torch.float16).from_weights(
                        wq, scales.view(n, -1), zeros.view(n, -1), bias=b))
                else:
                    lin = torch.nn.Linear(k, n, bias=True, dtype=torch.float16, device=dev)
                    layers.append(A16W8_INT8(device=dev, dtype=torch.float16).from_linear(lin))
            x = torch.randn(1, k, dtype=torch.float16, device=dev)
            for lin in layers[:2]:  # autotune outside the capture
                lin(x)
            packed = n * k // 2 + 2 * 2 * (n * k // 128) if bits == 4 else n * k + n * 4
            record(f"gemlite A16W{bits}", name, graph_time_us([lambda lin=lin, x=x: lin(x) for lin in layers]), packed,
                   gemlite=gemlite.__version__ if hasattr(gemlite, "__version__") else "?")
            del layers

    def inferlab_kernels():
        from inferlab.backends import kernels
        from inferlab.backends.int4 import int4_linear

        kernels.prepare()
        for name, shape in shapes.items():
            ws, bs = weights(shape, torch.float16)
            x = torch.randn(1, shape[1], dtype=torch.float16, device=dev)
            err = float((kernels.gemv_fp16(x, ws[0], bs[0]).float() - F.linear(x, ws[0], bs[0]).float()).abs().max())
            record("inferlab triton fp16 (tuned)", name,
                   graph_time_us([lambda w=w, b=b, x=x: kernels.gemv_fp16(x, w, b) for w, b in zip(ws, bs)]),
                   shape[0] * shape[1] * 2, max_abs_err=round(err, 5))
            del ws, bs
        for name, shape in shapes.items():
            n, k = shape
            layers = []
            for _ in range(copies_for(n * k // 2)):
                lin = torch.nn.Linear(k, n, dtype=torch.float16, device=dev)
                layers.append(int4_linear(lin))
                del lin
            x = torch.randn(1, k, dtype=torch.float16, device=dev)
            q = layers[0]
            got = kernels.gemv_int4(x, q.packed, q.scale, q.offset, q.bias, q.group_size)
            err = float((got.float() - F.linear(x, q.dequantize(), q.bias).float()).abs().max())
            packed = q.packed.numel() + 2 * q.scale.numel() * 2
            record("inferlab triton int4 (tuned)", name,
                   graph_time_us([lambda q=q, x=x: kernels.gemv_int4(x, q.packed, q.scale, q.offset, q.bias,
                                                                      q.group_size) for q in layers]),
                   packed, max_abs_err=round(err, 5))
            del layers

    attempt("inferlab", inferlab_kernels)
    attempt("bandwidth", bandwidth)
    attempt("cublas", cublas)
    attempt("triton", triton_sweep)
    attempt("inductor", inductor_mv)
    attempt("torchao4", lambda: torchao_int(4))
    attempt("gemlite4", lambda: gemlite(4))
    attempt("torchao8", lambda: torchao_int(8))
    attempt("gemlite8", lambda: gemlite(8))
    summary = {}
    for method, by_shape in result["kernels"].items():
        for layout, counts in per_token.items():
            if all(s in by_shape for s in counts):
                summary.setdefault(method, {})[layout] = round(sum(by_shape[s]["us"] * n for s, n in counts.items())
                                                               / 1e3, 3)
    result["ms_per_token_matmul"] = summary
    save()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
