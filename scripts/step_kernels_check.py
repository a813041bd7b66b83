"""Check the Triton kernels of `decode: kernels` (src/inferlab/backends/step_kernels.py) against their torch
reference, time them, and (given a model) compare the whole step's tokens with generate()'s.

    python scripts/step_kernels_check.py [--model-dir DIR] [--out FILE]    # on a CUDA machine: Phi-2's shapes
    TRITON_INTERPRET=1 python scripts/step_kernels_check.py --small        # anywhere: small shapes, interpreted

Every check draws fresh random inputs, poisons the outputs with NaN first, and reports the relative error
||out - ref|| / ||ref|| (the reference accumulates in fp32 from the same fp16 inputs). Timings: launches back to
back inside a CUDA graph (no host launch cost; CUDA events, median of 20 replays), rotating among enough weight
copies that they do not fit in the L2 cache; GB/s counts the weight bytes (packed int4, scales and zero points)
once. The output committed beside this script is
docs/step-kernels-h200.txt.
"""

from __future__ import annotations

import argparse
import functools
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


def worst_of(errs) -> float:
    """The largest error, or NaN if any is NaN (an output left unwritten: poisoned with NaN)."""
    return float("nan") if any(e != e for e in errs) else max(errs)


def weight_bytes(w) -> int:
    if hasattr(w, "packed"):
        return sum(t.numel() * t.element_size() for t in (w.packed, w.scale, w.offset))
    return w.numel() * w.element_size()


def linear(n, k, dtype, dev, int4: bool):
    lin = torch.nn.Linear(k, n, bias=True, dtype=torch.float32)
    torch.nn.init.normal_(lin.weight, std=k ** -0.5)
    lin = lin.to(dev, dtype)
    return int4_linear(lin).to(dev) if int4 else lin.weight.data


def graph_time(fns) -> float:
    """Median time (ms) of one call of each of fns, launched back to back inside a CUDA graph (no host launch cost
    in the figure), over 20 replays; fns cycle through enough weight copies that they do not sit in the L2."""
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:  # warm-up (autotuning) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for _ in range(5):
            for f in fns:
                f()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (5 * len(fns)))
    return sorted(times)[len(times) // 2]


def check_gemv(name, n, k, *, dev, dtype, int4, act_from, split, res, timing, lines, glu=False, bias=True,
               norm=False):
    """glu: the weight's n rows are [gate; up] and the output n / 2 rows of SiLU(gate) * up (no bias); int4: False,
    or the int4 kernel to check ("rows", "splitk"); norm: an RMSNorm of x in the prologue."""
    kernel = int4 or "rows"
    rms = (1 + 0.1 * torch.randn(k, device=dev, dtype=dtype), 1e-5) if norm else None
    copies = max(1, min(8, (200 << 20) // (n * k * (1 if int4 else 2)) + 1)) if timing else 1
    ws = [linear(n, k, dtype, dev, int4) for _ in range(copies)]
    b = torch.randn(n, device=dev, dtype=dtype) * 0.1 if bias and not glu else None
    rows = n // 2 if glu else n
    x = torch.randn(k, device=dev, dtype=dtype)
    resv = torch.randn(n, device=dev, dtype=dtype) if res else None
    outs = {}
    for impl, fn in (("ref", sk.ref_gemv), ("triton", functools.partial(sk.gemv, int4=kernel))):
        out2 = torch.full((n - split,), float("nan"), device=dev, dtype=dtype) if split else None
        if res:  # the residual is the output row itself, updated in place (the [dense | fc2] GEMV)
            out = r = resv.clone()
        else:
            out, r = torch.full((split or rows,), float("nan"), device=dev, dtype=dtype), None
        fn(x.clone(), ws[0], b, act_from=act_from, res=r, out=out, split=split, out2=out2, glu_rows=glu, norm=rms)
        outs[impl] = torch.cat([out, out2]) if split else out
    err = rel(outs["triton"], outs["ref"])
    line = f"{name:34s} N={n:6d} K={k:6d} {'int4' if int4 else str(dtype)[6:]:8s} rel err {err:.2e}"
    if timing:
        o1 = torch.empty(split or rows, device=dev, dtype=dtype)
        o2 = torch.empty(n - split, device=dev, dtype=dtype) if split else None
        r = torch.zeros(n, device=dev, dtype=dtype) if res else None
        fns = [lambda w=w: sk.gemv(x, w, b, act_from=act_from, res=r, out=r if res else o1, split=split, out2=o2,
                                   glu_rows=glu, int4=kernel, norm=rms) for w in ws]
        ms = graph_time(fns)
        line += f"  {ms * 1000:7.1f} us  {weight_bytes(ws[0]) / ms / 1e6:7.0f} GB/s"
    lines.append(line)
    return err


def check_norm(label, ref, kernel, k, *, dev, dtype, timing, lines, bias):
    """A norm kernel against its reference; bias: LayerNorm's (w, b) weights, else RMSNorm's w."""
    x = torch.randn(k, device=dev, dtype=dtype) * 3 + 1
    w = 1 + 0.1 * torch.randn(k, device=dev, dtype=dtype)
    weights = (w, 0.1 * torch.randn(k, device=dev, dtype=dtype)) if bias else (w,)
    outs = {}
    for impl, fn in (("ref", ref), ("triton", kernel)):
        outs[impl] = torch.full((k,), float("nan"), device=dev, dtype=dtype)
        fn(x, *weights, 1e-5, out=outs[impl])
    err = rel(outs["triton"], outs["ref"])
    line = f"{label} K={k}" + " " * (38 - len(label)) + f"rel err {err:.2e}"  # columns as in docs/step-kernels-h200.txt
    if timing:
        line += f"  {graph_time([lambda: kernel(x, *weights, 1e-5, out=outs['triton'])]) * 1000:7.1f} us"
    lines.append(line)
    return err


def check_layer_norm(k, **kw):
    return check_norm("layer norm", sk.ref_layer_norm, sk.layer_norm, k, bias=True, **kw)


def check_rms_norm(k, **kw):
    return check_norm("rms norm", sk.ref_rms_norm, sk.rms_norm, k, bias=False, **kw)


def check_attention(h, d, r, length, positions, *, dev, dtype, timing, lines, kv=None, one=False):
    """kv: key/value heads (grouped-query attention, Llama's layout); None: one per head (Phi's); one: the one-launch
    kernel (fuse_attention)."""
    errs = []
    kv = kv or h
    for pos in positions:
        qkv = torch.randn((h + 2 * kv) * d, device=dev, dtype=dtype)
        kc = torch.randn(1, kv, length, d, device=dev, dtype=dtype)
        vc = torch.randn(1, kv, length, d, device=dev, dtype=dtype)
        ang = torch.arange(length, device=dev)[:, None] * (10000 ** (-torch.arange(r // 2, device=dev) / (r // 2)))
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        p = torch.tensor([[pos]], device=dev)
        res = {}
        for impl, fn in (("ref", sk.ref_attention), ("triton", functools.partial(sk.attention, one=one))):
            k2, v2 = kc.clone(), vc.clone()
            out = torch.full((h * d,), float("nan"), device=dev, dtype=dtype)
            fn(qkv, k2, v2, cos, sin, p, out=out, scale=d ** -0.5)
            res[impl] = (out, k2, v2)
        err = max(rel(res["triton"][0], res["ref"][0]), rel(res["triton"][1], res["ref"][1]),
                  rel(res["triton"][2], res["ref"][2]))
        errs.append(err)
        kind = "attention 1" if one else "attention  "
        line = f"{kind} H={h} KV={kv} D={d} rot={r} L={length} pos={pos:4d}   rel err {err:.2e}"
        if timing:
            out = torch.empty(h * d, device=dev, dtype=dtype)
            args = (qkv, kc, vc, cos, sin, p)
            ms = graph_time([lambda a=args, o=out: sk.attention(*a, out=o, scale=d ** -0.5, one=one)])
            line += f"  {ms * 1000:7.1f} us"
        lines.append(line)
    return worst_of(errs)


def teacher_forced(be, seq: list[int], n_prompt: int, triton: bool) -> tuple[int, float]:
    """The kernel step fed the reference's own tokens (teacher forcing), eagerly, against the model's forward
    over the whole sequence: (positions whose argmax agrees, largest |logit difference| / logit std)."""
    from inferlab.backends.decode_step import DecodeStep

    dec, model = be.decoder, be.model
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([seq], device="cuda"), use_cache=False).logits[0].float()
        dec.static_cache(1, len(seq) + 1)
        dec.cache.reset()
        dec.prefill(torch.tensor([seq[:n_prompt]], device="cuda"))
        step = DecodeStep(model, triton=triton)
        step.bind(dec.cache, len(seq) + 1)
        agree, worst = 0, 0.0
        for p in range(n_prompt, len(seq)):
            nxt = step(torch.tensor([[seq[p]]], device="cuda"), torch.tensor([[p]], device="cuda"))
            ref = want[p]
            agree += int(nxt.item() == int(ref.argmax()))
            worst = max(worst, float((step.logits.float() - ref).abs().max() / ref.std()))
    return agree, worst


def check_tokens(model_dir: str, lines: list[str]) -> None:
    """decode: kernels (replayed as a CUDA graph) against generate() (dynamic cache) on the same prompt: how many
    of the 128 greedy tokens agree and where the first difference is; and the step fed generate()'s tokens."""
    import json
    from pathlib import Path

    from inferlab.backends.hf import HFBackend
    from inferlab.config import KERNEL_STEP_ARCHITECTURES

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    base = {"model_dir": model_dir, "device": "cuda", "attn": "sdpa", "precision": "fp16"}
    runs = {"generate": {"kv_cache": "dynamic"},  # Phi's step runs its fused block; Llama's fuses its own weights
            "kernels": {"kv_cache": "static", "decode": "kernels", "fuse_block": KERNEL_STEP_ARCHITECTURES[arch]}}
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
        if name == "kernels":  # the step fed generate()'s tokens: which part disagrees, if any
            seq = ids + got["generate"]
            for triton in (False, True):
                agree, worst = teacher_forced(be, seq, len(ids), triton)
                lines.append(f"teacher-forced {'triton' if triton else 'torch reference'} step, eager, against the "
                             f"model's forward: argmax {agree} of {len(seq) - len(ids)}, max |logit diff| / logit "
                             f"std {worst:.3f}")
        be.unload()
    for a, b in (("kernels", "generate"),):
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
    env = dict(dev=dev, dtype=dtype, timing=timing, lines=lines)
    gemv = functools.partial(check_gemv, act_from=None, split=None, res=False, **env)
    kinds = {False: "fp16", "rows": "int4", "splitk": "int4 splitk"}
    errs = []  # in this order: each check draws its inputs from the one seeded generator
    for int4, kind in kinds.items():
        errs.append(gemv(f"{kind} in: bias + GELU, split", 3 * hid + inter, hid, int4=int4,
                         act_from=3 * hid, split=3 * hid))
        errs.append(gemv(f"{kind} out: bias + residual in place", hid, hid + inter, int4=int4,
                         res=True))
    errs.append(gemv("fp16 head: bias", vocab, hid, int4=False))
    errs.append(check_layer_norm(hid, **env))
    positions = sorted({0, 1, 63, 64, length - 1} & set(range(length)))
    errs.append(check_attention(heads, d, r, length, positions, **env))
    phi_attention = (heads, d, r)
    # Llama's layer (SmolLM2-135M's shapes; small: tiny-llama's): [q; k; v] and [gate; up] with
    # SiLU(gate) * up, both without bias, RMSNorm, grouped-query attention, rotary over the head
    hid, inter, heads, kv, d = (576, 1536, 9, 3, 64) if not a.small else (256, 768, 4, 2, 64)
    for int4, kind in kinds.items():
        errs.append(gemv(f"{kind} llama [q; k; v]", (heads + 2 * kv) * d, hid, int4=int4,
                         bias=False))
        errs.append(gemv(f"{kind} llama [gate; up]: SiLU * up", 2 * inter, hid, int4=int4,
                         glu=True))
        errs.append(gemv(f"{kind} llama RMSNorm + [gate; up]", 2 * inter, hid, int4=int4,
                         glu=True, norm=True))
    vocab = 49152 if not a.small else vocab  # SmolLM2's tied head
    errs.append(gemv("fp16 llama RMSNorm + head", vocab, hid, int4=False, bias=False, norm=True))
    errs.append(check_rms_norm(hid, **env))
    for one in (False, True):  # the one-launch kernel (fuse_attention) on both layouts
        if one:
            errs.append(check_attention(*phi_attention, length, positions, **env, one=True))
        errs.append(check_attention(heads, d, d, length, positions, **env, kv=kv, one=one))
    worst = worst_of(errs)
    limit = 2e-4 if dtype == torch.float16 else 1e-5  # fp16: 5x the worst seen (4e-5 here, 1.4e-5 on an H200)
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
