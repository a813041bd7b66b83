"""Check the Triton kernels of `decode: kernels` (src/inferlab/backends/step_kernels.py) against their torch
reference, time them, and (given a model) compare the whole step's tokens with generate()'s.

    python scripts/step_kernels_check.py [--model-dir DIR] [--out FILE]    # on a CUDA machine: Phi-2's shapes
    TRITON_INTERPRET=1 python scripts/step_kernels_check.py --small        # anywhere: small shapes, interpreted

Every check draws fresh random inputs, poisons the outputs with NaN first, and reports the relative error
||out - ref|| / ||ref|| (the reference accumulates in fp32 from the same fp16 inputs). Timings: triton.testing's
do_bench (CUDA events, median), rotating among enough weight copies that they do not fit in the L2 cache; GB/s
counts the weight bytes (packed int4, scales and zero points) once. The output committed beside this script is
docs/step-kernels-h200.txt.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, "src")

from inferlab.backends import step_kernels as sk  # noqa: E402
from inferlab.backends.int4 import int4_linear  # noqa: E402


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def weight_bytes(w) -> int:
    if hasattr(w, "packed"):
        return sum(t.numel() * t.element_size() for t in (w.packed, w.scale, w.offset))
    return w.numel() * w.element_size()


def linear(n, k, dtype, dev, int4: bool):
    lin = torch.nn.Linear(k, n, bias=True, dtype=torch.float32)
    torch.nn.init.normal_(lin.weight, std=k ** -0.5)
    lin = lin.to(dev, dtype)
    return int4_linear(lin).to(dev) if int4 else lin.weight.data


def check_gemv(name, n, k, *, dev, dtype, int4, ln, act_from, split, res, timing, lines):
    copies = max(1, min(8, (200 << 20) // (n * k * (1 if int4 else 2)) + 1)) if timing else 1
    ws = [linear(n, k, dtype, dev, int4) for _ in range(copies)]
    b = torch.randn(n, device=dev, dtype=dtype) * 0.1
    x = torch.randn(k, device=dev, dtype=dtype)
    lnp = (1 + 0.1 * torch.randn(k, device=dev, dtype=dtype), 0.1 * torch.randn(k, device=dev, dtype=dtype), 1e-5) \
        if ln else None
    resv = torch.randn(n, device=dev, dtype=dtype) if res else None
    outs = {}
    for impl, fn in (("ref", sk.ref_gemv), ("triton", sk.gemv)):
        out2 = torch.full((n - split,), float("nan"), device=dev, dtype=dtype) if split else None
        if res:  # the residual is the output row itself, updated in place (the [dense | fc2] GEMV)
            out = r = resv.clone()
        else:
            out, r = torch.full((split or n,), float("nan"), device=dev, dtype=dtype), None
        fn(x.clone(), ws[0], b, ln=lnp, act_from=act_from, res=r, out=out, split=split, out2=out2)
        outs[impl] = torch.cat([out, out2]) if split else out
    err = rel(outs["triton"], outs["ref"])
    line = f"{name:34s} N={n:6d} K={k:6d} {'int4' if int4 else str(dtype)[6:]:8s} rel err {err:.2e}"
    if timing:
        from triton.testing import do_bench

        i = [0]
        o1 = torch.empty(split or n, device=dev, dtype=dtype)
        o2 = torch.empty(n - split, device=dev, dtype=dtype) if split else None
        r = torch.zeros(n, device=dev, dtype=dtype) if res else None  # zeros: the sum stays finite over repeats

        def run():
            i[0] = (i[0] + 1) % copies
            sk.gemv(x, ws[i[0]], b, ln=lnp, act_from=act_from, res=r, out=r if res else o1, split=split, out2=o2)

        ms = do_bench(run, warmup=50, rep=300, return_mode="median")
        line += f"  {ms * 1000:7.1f} us  {weight_bytes(ws[0]) / ms / 1e6:7.0f} GB/s"
    lines.append(line)
    return err


def check_attention(h, d, r, length, positions, *, dev, dtype, timing, lines):
    errs = []
    for pos in positions:
        qkv = torch.randn(3 * h * d, device=dev, dtype=dtype)
        kc = torch.randn(1, h, length, d, device=dev, dtype=dtype)
        vc = torch.randn(1, h, length, d, device=dev, dtype=dtype)
        ang = torch.arange(length, device=dev)[:, None] * (10000 ** (-torch.arange(r // 2, device=dev) / (r // 2)))
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        p = torch.tensor([[pos]], device=dev)
        res = {}
        for impl, fn in (("ref", sk.ref_attention), ("triton", sk.attention)):
            k2, v2 = kc.clone(), vc.clone()
            out = torch.full((h * d,), float("nan"), device=dev, dtype=dtype)
            fn(qkv, k2, v2, cos, sin, p, out=out, scale=d ** -0.5)
            res[impl] = (out, k2, v2)
        err = max(rel(res["triton"][0], res["ref"][0]), rel(res["triton"][1], res["ref"][1]),
                  rel(res["triton"][2], res["ref"][2]))
        errs.append(err)
        line = f"attention H={h} D={d} rot={r} L={length} pos={pos:4d}          rel err {err:.2e}"
        if timing:
            from triton.testing import do_bench

            out = torch.empty(h * d, device=dev, dtype=dtype)
            args = (qkv, kc, vc, cos, sin, p)
            ms = do_bench(lambda a=args, o=out: sk.attention(*a, out=o, scale=d ** -0.5), warmup=50, rep=200,
                          return_mode="median")
            line += f"  {ms * 1000:7.1f} us"
        lines.append(line)
    return max(errs)


def check_tokens(model_dir: str, lines: list[str]) -> None:
    """decode: kernels against generate() (dynamic cache) and the graph loop of the fused block with the Triton
    GEMV, on the same prompt: how many of the 128 greedy tokens agree, and where the first difference is."""
    from inferlab.backends.hf import HFBackend

    base = {"model_dir": model_dir, "device": "cuda", "attn": "sdpa", "precision": "fp16"}
    runs = {"generate": {"kv_cache": "dynamic"},
            "graph": {"kv_cache": "static", "compile": True, "decode": "graph", "fuse_block": True,
                      "gemv": "triton"},
            "kernels": {"kv_cache": "static", "decode": "kernels", "fuse_block": True}}
    got = {}
    for name, s in runs.items():
        be = HFBackend({**base, **s})
        be.load()
        ids = be.tokenize("The history of the printing press begins in the fifteenth century, when")
        be.request([ids], 128)  # cold
        t = be.request([ids], 128)
        got[name] = t.output_ids[0]
        step = (t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) * 1000
        lines.append(f"tokens {name:9s}: {step:.3f} ms per step; first tokens {got[name][:8]}")
        be.unload()
    for a, b in (("kernels", "generate"), ("kernels", "graph"), ("graph", "generate")):
        same = sum(x == y for x, y in zip(got[a], got[b]))
        first = next((i for i, (x, y) in enumerate(zip(got[a], got[b])) if x != y), None)
        lines.append(f"tokens {a} vs {b}: {same} of {len(got[a])} equal; first difference at "
                     f"{'none' if first is None else first}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="small shapes (for the Triton interpreter)")
    ap.add_argument("--fp16", action="store_true", help="fp16 inputs also without CUDA (interpreter)")
    ap.add_argument("--model-dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda or a.fp16 else torch.float32
    timing = cuda and not a.small
    torch.manual_seed(0)
    lines = [f"device: {torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter)'}; torch "
             f"{torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    hid, inter, heads, d, r, vocab, length = (2560, 10240, 32, 80, 32, 51200, 192) if not a.small else \
        (256, 1024, 4, 64, 32, 1000, 150)
    worst = 0.0
    for int4 in (False, True):
        kind = "int4" if int4 else "fp16"
        worst = max(worst, check_gemv(f"{kind} in: LN + bias + GELU, split", 3 * hid + inter, hid, dev=dev,
                                      dtype=dtype, int4=int4, ln=True, act_from=3 * hid, split=3 * hid, res=False,
                                      timing=timing, lines=lines))
        worst = max(worst, check_gemv(f"{kind} out: bias + residual in place", hid, hid + inter, dev=dev,
                                      dtype=dtype, int4=int4, ln=False, act_from=None, split=None, res=True,
                                      timing=timing, lines=lines))
    worst = max(worst, check_gemv("fp16 head: LN + bias", vocab, hid, dev=dev, dtype=dtype, int4=False, ln=True,
                                  act_from=None, split=None, res=False, timing=timing, lines=lines))
    positions = sorted({0, 1, 63, 64, length - 1} & set(range(length)))
    worst = max(worst, check_attention(heads, d, r, length, positions, dev=dev, dtype=dtype,
                                       timing=timing, lines=lines))
    limit = 2e-3 if dtype == torch.float16 else 1e-5
    lines.append(f"worst relative error {worst:.2e} (limit {limit:.0e}): {'PASS' if worst < limit else 'FAIL'}")
    if a.model_dir and cuda:
        check_tokens(a.model_dir, lines)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if worst < limit else 1


if __name__ == "__main__":
    sys.exit(main())
