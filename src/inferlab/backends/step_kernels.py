"""The kernels of the hand-written decode step (`decode: kernels`, backends/decode_step.py), in Triton and as a
reference in plain torch that computes the same function (the CPU path, and what the Triton kernels are checked
against: scripts/step_kernels_check.py on the GPU, tests/test_decode_step.py on the CPU).

A decode step of Phi's fused parallel block (backends/fuse.py) is then three kernels per layer instead of nine:
- `gemv`: y = W h + b over the layer's [q; k; v; fc1] matrix with h = LayerNorm(x) computed in its prologue (each
  program normalises the one input row itself, so no kernel writes h), GELU applied in the epilogue to the rows from
  `act_from` on (fc1's), and the output split between two buffers at row `split` (q, k, v to one, fc1's activation
  to the other). Over [dense | fc2] it adds the residual in the epilogue and writes the layer's output in place.
  fp16/bf16 weights, or int4-inductor's packed layout (backends/int4.py).
- `attention`: one program per head: rotary embedding of q and the new k (partial rotary, rotate-half), the new k
  and v written into the static cache at the step's position, and attention of q over the cache's first `pos`
  positions plus the new one (online softmax in fp32), reading the cache once. The position is read from a device
  tensor, so the step can be captured once as a CUDA graph and replayed for every token.

Each kernel rounds where the model's own code rounds (the normalised input, q and k after rotary, each output) and
accumulates in fp32 elsewhere.
"""

from __future__ import annotations

import math

GELU_C = math.sqrt(2 / math.pi)  # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))


# --- the reference, in torch (any device) -----------------------------------------------------------------------

def ref_gemv(x, w, b, *, ln=None, act_from=None, res=None, out, split=None, out2=None):
    """What `gemv` computes: x (K,) in the model's dtype; w a weight (N, K) or an Int4Linear; ln (weight, bias,
    eps) or None; rows >= act_from get GELU (tanh); res (N,) added last; rows < split go to out[:split], the rest to
    out2 (split None: all to out)."""
    import torch

    xf = x.float()
    if ln is not None:
        g, beta, eps = ln
        h = torch.nn.functional.layer_norm(xf, xf.shape, g.float(), beta.float(), eps)
        xf = h.to(x.dtype).float()
    wf = w.dequantize(torch.float32) if hasattr(w, "packed") else w.float()
    y = wf @ xf
    if b is not None:
        y = y + b.float()
    if act_from is not None:
        a = y[act_from:]
        y = torch.cat([y[:act_from], 0.5 * a * (1 + torch.tanh(GELU_C * (a + 0.044715 * a ** 3)))])
    if res is not None:
        y = y + res.float()
    y = y.to(out.dtype)
    if split is None:
        out.copy_(y)
    else:
        out.copy_(y[:split])
        out2.copy_(y[split:])


def rotate(t, cos, sin, rot: int):
    """Partial rotary embedding (rotate-half) of t (..., D) over its first `rot` features, in fp32."""
    import torch

    r, rest = t[..., :rot], t[..., rot:]
    x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
    return torch.cat([r * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def ref_attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float):
    """What `attention` computes for one sequence: qkv (3 H D,), caches (1, H, L, D), cos/sin (L, R), pos a
    one-element integer tensor; writes the new k and v at pos and out (H D,)."""
    import torch

    _, n_heads, _, d = k_cache.shape
    p = int(pos.reshape(-1)[0])
    q, k, v = qkv.view(3, n_heads, d).float()
    c, s = cos[p].float(), sin[p].float()
    rot = cos.shape[-1]
    q = rotate(q, c, s, rot).to(qkv.dtype)
    k = rotate(k, c, s, rot).to(k_cache.dtype)
    k_cache[0, :, p] = k
    v_cache[0, :, p] = v.to(v_cache.dtype)
    keys, values = k_cache[0, :, : p + 1].float(), v_cache[0, :, : p + 1].float()
    weights = torch.softmax(torch.einsum("hd,htd->ht", q.float(), keys) * scale, dim=-1)
    out.copy_(torch.einsum("ht,htd->hd", weights, values).reshape(-1).to(out.dtype))


def _triton():
    """The Triton kernels (gemv fp16, gemv int4, attention), imported on first use."""
    from inferlab.backends import step_triton as t

    return t.gemv_fp16, t.gemv_int4, t.attention_kernel


def available() -> bool:
    from inferlab.backends.kernels import available as cuda_and_triton

    return cuda_and_triton()


def prepare() -> None:
    """Build the kernels (outside any capture)."""
    _triton()


def gemv(x, w, b, *, ln=None, act_from=None, res=None, out, split=None, out2=None):
    """The Triton `gemv` (same arguments as ref_gemv; x, b, ln, res, out, out2 contiguous CUDA tensors)."""
    fp16, int4, _ = _triton()
    n = w.out_features if hasattr(w, "packed") else w.shape[0]
    lnw, lnb, eps = ln if ln is not None else (x, x, 0.0)
    flags = dict(LN=ln is not None, HAS_BIAS=b is not None, ACT=act_from is not None, RES=res is not None)
    b = b if b is not None else x
    res = res if res is not None else x
    split, out2 = (n, out) if split is None else (split, out2)
    act_from = act_from if act_from is not None else n
    if hasattr(w, "packed"):
        _launch(int4, n, x, w.packed, w.scale, w.offset, b, lnw, lnb, res, out, out2, n, w.packed.shape[1],
                w.scale.shape[1], split, act_from, float(eps), GROUP=w.group_size, **flags)
    else:
        _launch(fp16, n, x, w, b, lnw, lnb, res, out, out2, n, w.shape[1], split, act_from, float(eps), **flags)


def _launch(tuned, n: int, *args, **kwargs) -> None:
    """A GEMV launch: through its autotuner, or under the Triton interpreter (TRITON_INTERPRET=1, no GPU, no
    timing) with the first of its configurations."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg = tuned.configs[0]
        tuned.fn[(-(-n // cfg.kwargs["BLOCK_N"]),)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps)
        return
    tuned[lambda meta: (-(-n // meta["BLOCK_N"]),)](*args, **kwargs)


def attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float):
    """The Triton `attention` (same arguments as ref_attention; batch 1)."""
    import triton

    _, n_heads, length, d = k_cache.shape
    rot = cos.shape[-1]
    _triton()[2][(n_heads,)](qkv, k_cache, v_cache, cos, sin, pos, out, length, scale, H=n_heads, D=d, R=rot,
                             BLOCK_D=triton.next_power_of_2(d), BLOCK_T=64, num_warps=4)
