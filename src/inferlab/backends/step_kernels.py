"""The kernels of `decode: kernels` (decode_step.py): Triton wrappers and their torch references.

The references are the CPU path and what the Triton kernels are checked against. Phi's fused
block (fuse.py) becomes four kernels per layer instead of nine:
- `layer_norm`: h = LayerNorm(x), one program for the row.
- `gemv`: y = W h + b over [q; k; v; fc1], GELU on the rows from `act_from`, the output split at
  row `split`; over [dense | fc2] it adds the residual and writes the layer's output in place.
- `attention`: flash-decoding in two launches (per head and cache chunk, then a combine); the
  position is read from a device tensor, so the step is captured once as a CUDA graph.
Each kernel rounds where the model's code rounds and accumulates in fp32 elsewhere.
"""

from __future__ import annotations

import math

GELU_C = math.sqrt(2 / math.pi)  # gelu_new: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))


# --- the reference, in torch (any device) ---

def ref_layer_norm(x, w, b, eps: float, *, out):
    """What `layer_norm` computes: out = LayerNorm(x) (one row), rounded to out's dtype."""
    import torch

    h = torch.nn.functional.layer_norm(x.float(), x.shape, w.float(), b.float(), eps)
    out.copy_(h.to(out.dtype))


def ref_rms_norm(x, w, eps: float, *, out):
    """What `rms_norm` computes: out = w * round(x / rms(x)), one row.

    Llama's RMSNorm rounds the normalised row to the model's dtype before the weight."""
    import torch

    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean() + eps)).to(x.dtype)
    out.copy_((w.float() * n.float()).to(out.dtype))


def glu(g, u, dtype):
    """SiLU(g) * u as Llama's MLP rounds it in `dtype`: g, u, SiLU(g) and the product."""
    import torch

    g, u = g.to(dtype).float(), u.to(dtype).float()
    return (torch.nn.functional.silu(g).to(dtype).float() * u).to(dtype)


def ref_gemv(x, w, b, *, act_from=None, res=None, out, split=None, out2=None,
             glu_rows: bool = False, norm=None):
    """What `gemv` computes: x (K,); w a weight (N, K) or an Int4Linear.

    Rows >= act_from get GELU (tanh); res (N,) is added last; rows < split go to out, the rest
    to out2. glu_rows: w is [gate; up] and out = SiLU(gate x) * (up x); norm: (weight, eps) of
    an RMSNorm applied to x first."""
    import torch

    if norm is not None:
        h = torch.empty_like(x)
        ref_rms_norm(x, *norm, out=h)
        x = h

    wf = w.dequantize(torch.float32) if hasattr(w, "packed") else w.float()
    y = wf @ x.float()
    if glu_rows:
        half = y.shape[0] // 2
        out.copy_(glu(y[:half], y[half:], out.dtype))
        return
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
    """Partial rotary embedding (rotate-half) of t (..., D) over its first `rot` features."""
    import torch

    r, rest = t[..., :rot], t[..., rot:]
    x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
    return torch.cat([r * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def ref_attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float):
    """What `attention` computes for one sequence; writes the new k and v at pos, and out (H D,).

    qkv ((H + 2 KV) D,), caches (1, KV, L, D), cos/sin (L, R), pos a one-element tensor.
    Query head h reads key/value head h // (H / KV) (grouped-query attention; Phi: KV = H)."""
    import torch

    _, n_kv, _, d = k_cache.shape
    n_heads = qkv.numel() // d - 2 * n_kv
    p = int(pos.reshape(-1)[0])
    q, k, v = qkv.view(-1, d).float().split([n_heads, n_kv, n_kv])
    c, s = cos[p].float(), sin[p].float()
    rot = cos.shape[-1]
    q = rotate(q, c, s, rot).to(qkv.dtype)
    k = rotate(k, c, s, rot).to(k_cache.dtype)
    k_cache[0, :, p] = k
    v_cache[0, :, p] = v.to(v_cache.dtype)
    rep = n_heads // n_kv
    keys = k_cache[0, :, : p + 1].float().repeat_interleave(rep, dim=0)
    values = v_cache[0, :, : p + 1].float().repeat_interleave(rep, dim=0)
    weights = torch.softmax(torch.einsum("hd,htd->ht", q.float(), keys) * scale, dim=-1)
    out.copy_(torch.einsum("ht,htd->hd", weights, values).reshape(-1).to(out.dtype))


CHUNK = 32  # cache positions per attention program
LAUNCHES = [0]  # running count of the wrappers' Triton launches (the step's launches per token)


def _triton():
    from inferlab.backends import step_triton

    return step_triton


def prepare() -> None:
    """Import (build) the kernels, outside any capture."""
    _triton()


def _launch(tuned, n: int, *args, **kwargs) -> None:
    """A GEMV launch: through its autotuner, or interpreted (no timing) with a fixed configuration."""
    from inferlab.backends.kernels import interpreted

    LAUNCHES[0] += 1
    if interpreted():  # the most rows per program, slices of K (split-K), groups per step
        def size(c):
            return tuple(c.kwargs.get(k, 1) for k in ("BLOCK_N", "SPLIT_K", "NG"))

        cfg = max(tuned.configs, key=size)
        grid = (-(-n // cfg.kwargs.get("BLOCK_N", 1)), cfg.kwargs.get("SPLIT_K", 1))
        tuned.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps)
        return
    tuned[lambda meta: (-(-n // meta.get("BLOCK_N", 1)), meta.get("SPLIT_K", 1))](*args, **kwargs)


def layer_norm(x, w, b, eps: float, *, out):
    """The Triton `layer_norm` (same arguments as ref_layer_norm)."""
    import triton

    k = x.shape[-1]
    LAUNCHES[0] += 1
    block = triton.next_power_of_2(k)
    _triton().layer_norm_kernel[(1,)](x, w, b, out, k, float(eps), BLOCK=block, num_warps=8)


def rms_norm(x, w, eps: float, *, out):
    """The Triton `rms_norm` (same arguments as ref_rms_norm)."""
    import triton

    k = x.shape[-1]
    LAUNCHES[0] += 1
    block = triton.next_power_of_2(k)
    _triton().rms_norm_kernel[(1,)](x, w, out, k, float(eps), BLOCK=block, num_warps=8)


def _splitk_scratch(rows: int, device):
    """split-K's fp32 partial sums and per-block counts, zero between launches, shared by the step.

    Made or grown in the warm-up, never inside a graph capture."""
    import torch

    have = _SPLITK.get(device)
    if have is None or have[0].numel() < rows:
        _SPLITK[device] = (torch.zeros(rows, dtype=torch.float32, device=device),
                           torch.zeros(rows, dtype=torch.int32, device=device))
    return _SPLITK[device]


_SPLITK: dict = {}


def gemv(x, w, b, *, act_from=None, res=None, out, split=None, out2=None, glu_rows: bool = False,
         int4: str = "rows", norm=None):
    """The Triton `gemv` (ref_gemv's arguments, contiguous CUDA tensors).

    int4: the kernel that runs an Int4Linear (config.STEP_INT4_GEMVS)."""
    t = _triton()
    n = w.out_features if hasattr(w, "packed") else w.shape[0]
    if glu_rows:  # program i computes row i of gate and of up (n / 2 rows apart)
        if b is not None or act_from is not None or res is not None or split is not None:
            raise ValueError("gemv: glu_rows takes no bias, activation, residual or split")
        n //= 2
    flags = dict(HAS_BIAS=b is not None, ACT=act_from is not None, RES=res is not None,
                 GLU=glu_rows, NORM=norm is not None)
    nw, eps = norm if norm is not None else (x, 0.0)
    b = b if b is not None else x
    res = res if res is not None else x
    split, out2 = (n, out) if split is None else (split, out2)
    act_from = act_from if act_from is not None else n
    eps = float(eps)
    if hasattr(w, "packed") and int4 == "splitk":
        part, count = _splitk_scratch(2 * n, x.device)
        _launch(t.gemv_int4_splitk, n, x, w.packed, w.scale, w.offset, b, res, out, out2, part,
                count, n, w.packed.shape[1], w.scale.shape[1], split, act_from, nw, eps,
                GROUP=w.group_size, **flags)
    elif hasattr(w, "packed"):
        _launch(t.gemv_int4, n, x, w.packed, w.scale, w.offset, b, res, out, out2, n,
                w.packed.shape[1], w.scale.shape[1], split, act_from, nw, eps,
                GROUP=w.group_size, **flags)
    else:
        _launch(t.gemv_fp16, n, x, w, b, res, out, out2, n, w.shape[1], split, act_from, nw, eps,
                **flags)


# the attention's per-chunk statistics per shape and device, shared by every layer and step:
# safe while they run one after another on one stream (eager or replayed as one graph)
_SCRATCH: dict = {}


def attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float, one: bool = False):
    """The Triton `attention` (ref_attention's arguments; batch 1).

    one: a single launch, a program per query head over the whole cache (attention_one_kernel)."""
    import torch
    import triton

    t = _triton()
    _, n_kv, length, d = k_cache.shape
    n_heads = qkv.numel() // d - 2 * n_kv
    chunks, block_d = triton.cdiv(length, CHUNK), triton.next_power_of_2(d)
    if one:
        LAUNCHES[0] += 1
        t.attention_one_kernel[(n_heads,)](
            qkv, k_cache, v_cache, cos, sin, pos, out, length, scale, H=n_heads, KV=n_kv, D=d,
            R=cos.shape[-1], BLOCK_D=block_d, BLOCK_T=CHUNK, num_warps=2,
        )
        return
    key = (n_heads, chunks, block_d, k_cache.device)
    if key not in _SCRATCH:  # made on the first (warm-up) call, never inside a graph capture
        _SCRATCH[key] = (torch.empty(n_heads * chunks, device=k_cache.device),
                         torch.empty(n_heads * chunks, device=k_cache.device),
                         torch.empty(n_heads * chunks * block_d, device=k_cache.device))
    m, total, acc = _SCRATCH[key]
    LAUNCHES[0] += 2
    t.attention_part_kernel[(n_heads, chunks)](
        qkv, k_cache, v_cache, cos, sin, pos, m, total, acc, length, chunks, scale, H=n_heads,
        KV=n_kv, D=d, R=cos.shape[-1], BLOCK_D=block_d, BLOCK_T=CHUNK, num_warps=2,
    )
    block_s = max(2, triton.next_power_of_2(chunks))
    t.attention_combine_kernel[(n_heads,)](m, total, acc, out, chunks, D=d, BLOCK_D=block_d,
                                           BLOCK_S=block_s, num_warps=2)
