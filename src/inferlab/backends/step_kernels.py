"""The kernels of the hand-written decode step (`decode: kernels`, backends/decode_step.py), in Triton
(backends/step_triton.py) and as a reference in plain torch that computes the same function (the CPU path, and what
the Triton kernels are checked against: scripts/step_kernels_check.py on the GPU, tests/test_decode_step.py on the
CPU).

A decode step of Phi's fused parallel block (backends/fuse.py) is then four kernels per layer instead of nine:
- `layer_norm`: h = LayerNorm(x), one program for the row.
- `gemv`: y = W h + b over the layer's [q; k; v; fc1] matrix with GELU applied in the epilogue to the rows from
  `act_from` on (fc1's), the output split between two buffers at row `split` (q, k, v to one, fc1's activation to
  the other); over [dense | fc2] it adds the residual in the epilogue and writes the layer's output in place.
  fp16/bf16 weights, or int4-inductor's packed layout (backends/int4.py).
- `attention`: flash-decoding in two launches: programs (head, chunk of the cache) each weigh q (rotary applied)
  against their chunk of the positions before `pos`, the chunk holding `pos` also applies rotary to the new k,
  writes k and v into the static cache and weighs them from registers; a second kernel combines the chunks per
  head. The position is read from a device tensor, so the step is captured once as a CUDA graph and replayed.

Each kernel rounds where the model's own code rounds (the normalised input, q and k after rotary, each output) and
accumulates in fp32 elsewhere.
"""

from __future__ import annotations

import math

GELU_C = math.sqrt(2 / math.pi)  # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))


# --- the reference, in torch (any device) -----------------------------------------------------------------------

def ref_layer_norm(x, w, b, eps: float, *, out):
    """What `layer_norm` computes: out = LayerNorm(x) (one row), rounded to out's dtype."""
    import torch

    out.copy_(torch.nn.functional.layer_norm(x.float(), x.shape, w.float(), b.float(), eps).to(out.dtype))


def ref_rms_norm(x, w, eps: float, *, out):
    """What `rms_norm` computes: out = w * round(x / rms(x)) (one row; Llama's RMSNorm, which rounds the normalised
    row to the model's dtype before the weight multiplies it)."""
    import torch

    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean() + eps)).to(x.dtype)
    out.copy_((w.float() * n.float()).to(out.dtype))


def glu(g, u, dtype):
    """SiLU(g) * u as Llama's MLP rounds it in `dtype`: g and u (fp32 sums) rounded, SiLU(g) rounded, the product."""
    import torch

    g, u = g.to(dtype).float(), u.to(dtype).float()
    return (torch.nn.functional.silu(g).to(dtype).float() * u).to(dtype)


def ref_gemv(x, w, b, *, act_from=None, res=None, out, split=None, out2=None, glu_rows: bool = False, norm=None):
    """What `gemv` computes: x (K,) in the model's dtype; w a weight (N, K) or an Int4Linear; rows >= act_from get
    GELU (tanh); res (N,) added last; rows < split go to out[:split], the rest to out2 (split None: all to out).
    glu_rows: w is [gate; up] (2 N rows) and out (N,) = SiLU(gate x) * (up x), rounded as Llama's MLP does.
    norm: (weight, eps) of an RMSNorm applied to x first (ref_rms_norm's function)."""
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
    """Partial rotary embedding (rotate-half) of t (..., D) over its first `rot` features, in fp32."""
    import torch

    r, rest = t[..., :rot], t[..., rot:]
    x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
    return torch.cat([r * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def ref_attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float):
    """What `attention` computes for one sequence: qkv ((H + 2 KV) D,), caches (1, KV, L, D), cos/sin (L, R), pos a
    one-element integer tensor; writes the new k and v at pos and out (H D,). Query head h reads key/value head
    h // (H / KV) (grouped-query attention; Phi: KV = H)."""
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
LAUNCHES = [0]  # Triton kernel launches issued by the wrappers below, a running count (the step's launches per token)


def _triton():
    from inferlab.backends import step_triton

    return step_triton


def prepare() -> None:
    """Import (build) the kernels, outside any capture."""
    _triton()


def _launch(tuned, n: int, *args, **kwargs) -> None:
    """A GEMV launch: through its autotuner, or under the Triton interpreter (TRITON_INTERPRET=1, no GPU, no
    timing) with the configuration of the most rows per program."""
    from inferlab.backends.kernels import interpreted

    LAUNCHES[0] += 1
    if interpreted():  # the most rows per program, the most slices of K (split-K), the most groups per step
        cfg = max(tuned.configs, key=lambda c: tuple(c.kwargs.get(k, 1) for k in ("BLOCK_N", "SPLIT_K", "NG")))
        rows = cfg.kwargs.get("BLOCK_N", 1)
        tuned.fn[(-(-n // rows), cfg.kwargs.get("SPLIT_K", 1))](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps)
        return
    tuned[lambda meta: (-(-n // meta.get("BLOCK_N", 1)), meta.get("SPLIT_K", 1))](*args, **kwargs)


def layer_norm(x, w, b, eps: float, *, out):
    """The Triton `layer_norm` (same arguments as ref_layer_norm)."""
    import triton

    k = x.shape[-1]
    LAUNCHES[0] += 1
    _triton().layer_norm_kernel[(1,)](x, w, b, out, k, float(eps), BLOCK=triton.next_power_of_2(k), num_warps=8)


def rms_norm(x, w, eps: float, *, out):
    """The Triton `rms_norm` (same arguments as ref_rms_norm)."""
    import triton

    k = x.shape[-1]
    LAUNCHES[0] += 1
    _triton().rms_norm_kernel[(1,)](x, w, out, k, float(eps), BLOCK=triton.next_power_of_2(k), num_warps=8)


def _splitk_scratch(rows: int, device):
    """split-K's fp32 partial sums (rows) and per-block counts, zero between launches (each launch leaves them so),
    shared by every int4 GEMV of the step: made or grown in the warm-up, never inside a graph capture."""
    import torch

    have = _SPLITK.get(device)
    if have is None or have[0].numel() < rows:
        _SPLITK[device] = (torch.zeros(rows, dtype=torch.float32, device=device),
                           torch.zeros(rows, dtype=torch.int32, device=device))
    return _SPLITK[device]


_SPLITK: dict = {}


def gemv(x, w, b, *, act_from=None, res=None, out, split=None, out2=None, glu_rows: bool = False,
         int4: str = "rows", norm=None):
    """The Triton `gemv` (same arguments as ref_gemv; x, b, res, out, out2 contiguous CUDA tensors); int4: which
    kernel runs an Int4Linear (config.STEP_INT4_GEMVS: gemv_int4 or gemv_int4_splitk)."""
    t = _triton()
    n = w.out_features if hasattr(w, "packed") else w.shape[0]
    if glu_rows:  # a program computes row i of gate and of up (n / 2 rows apart) and writes SiLU(gate) * up
        if b is not None or act_from is not None or res is not None or split is not None:
            raise ValueError("gemv: glu_rows takes no bias, activation, residual or split")
        n //= 2
    flags = dict(HAS_BIAS=b is not None, ACT=act_from is not None, RES=res is not None, GLU=glu_rows,
                 NORM=norm is not None)
    nw, eps = norm if norm is not None else (x, 0.0)
    b = b if b is not None else x
    res = res if res is not None else x
    split, out2 = (n, out) if split is None else (split, out2)
    act_from = act_from if act_from is not None else n
    if hasattr(w, "packed") and int4 == "splitk":
        part, count = _splitk_scratch(2 * n, x.device)
        _launch(t.gemv_int4_splitk, n, x, w.packed, w.scale, w.offset, b, res, out, out2, part, count, n,
                w.packed.shape[1], w.scale.shape[1], split, act_from, nw, float(eps), GROUP=w.group_size, **flags)
    elif hasattr(w, "packed"):
        _launch(t.gemv_int4, n, x, w.packed, w.scale, w.offset, b, res, out, out2, n, w.packed.shape[1],
                w.scale.shape[1], split, act_from, nw, float(eps), GROUP=w.group_size, **flags)
    else:
        _launch(t.gemv_fp16, n, x, w, b, res, out, out2, n, w.shape[1], split, act_from, nw, float(eps), **flags)


# the attention's per-chunk statistics, one set per shape and device, shared by every layer and step: safe while they
# run one after another on one stream (the decode step's launches, eager or replayed as one graph)
_SCRATCH: dict = {}


def attention(qkv, k_cache, v_cache, cos, sin, pos, *, out, scale: float, one: bool = False):
    """The Triton `attention` (same arguments as ref_attention; batch 1); one: in one launch, a program per query
    head over the whole cache (attention_one_kernel), instead of programs per head and chunk and a combine."""
    import torch
    import triton

    t = _triton()
    _, n_kv, length, d = k_cache.shape
    n_heads = qkv.numel() // d - 2 * n_kv
    chunks, block_d = triton.cdiv(length, CHUNK), triton.next_power_of_2(d)
    if one:
        LAUNCHES[0] += 1
        t.attention_one_kernel[(n_heads,)](qkv, k_cache, v_cache, cos, sin, pos, out, length, scale, H=n_heads,
                                           KV=n_kv, D=d, R=cos.shape[-1], BLOCK_D=block_d, BLOCK_T=CHUNK,
                                           num_warps=2)
        return
    key = (n_heads, chunks, block_d, k_cache.device)
    if key not in _SCRATCH:  # made on the first (warm-up) call, never inside a graph capture
        _SCRATCH[key] = (torch.empty(n_heads * chunks, device=k_cache.device),
                         torch.empty(n_heads * chunks, device=k_cache.device),
                         torch.empty(n_heads * chunks * block_d, device=k_cache.device))
    m, total, acc = _SCRATCH[key]
    LAUNCHES[0] += 2
    t.attention_part_kernel[(n_heads, chunks)](qkv, k_cache, v_cache, cos, sin, pos, m, total, acc, length, chunks,
                                               scale, H=n_heads, KV=n_kv, D=d, R=cos.shape[-1], BLOCK_D=block_d,
                                               BLOCK_T=CHUNK, num_warps=2)
    t.attention_combine_kernel[(n_heads,)](m, total, acc, out, chunks, D=d, BLOCK_D=block_d,
                                           BLOCK_S=max(2, triton.next_power_of_2(chunks)), num_warps=2)
