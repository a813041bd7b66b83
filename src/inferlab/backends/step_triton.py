"""The Triton kernels of `decode: kernels` (their torch references, the wrappers and what they compute:
backends/step_kernels.py, which imports this module only where Triton is installed). The GEMVs are in
triton.autotune: rows per program, chunk and warps picked by timing on the first call of each shape, before the
step is captured as a CUDA graph; the outputs are restored after each trial, since the residual is added in place.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ln_stats(x_ptr, K, eps, BLOCK: tl.constexpr):
    rk = tl.arange(0, BLOCK)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK):
        s += tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0).to(tl.float32)
    mean = tl.sum(s, axis=0) / K
    v = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK):
        xv = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0).to(tl.float32)
        v += tl.where(k0 + rk < K, (xv - mean) * (xv - mean), 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(v, axis=0) / K + eps)

@triton.jit
def normed(x_ptr, lnw_ptr, lnb_ptr, k, inside, mean, rstd, LN: tl.constexpr):
    """x[k] in fp32, layer-normed and rounded to x's dtype where LN (as the model feeds its projection)."""
    x = tl.load(x_ptr + k, mask=inside, other=0)
    if LN:
        h = (x.to(tl.float32) - mean) * rstd * tl.load(lnw_ptr + k, mask=inside, other=0).to(tl.float32) \
            + tl.load(lnb_ptr + k, mask=inside, other=0).to(tl.float32)
        x = tl.where(inside, h, 0.0).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)

@triton.jit
def epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS: tl.constexpr,
             ACT: tl.constexpr, RES: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=live, other=0).to(tl.float32)
    if ACT:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u), overflow-safe at both ends
        y = tl.where(rn >= ACT_FROM, 0.5 * y * (1.0 + t), y)
    if RES:
        y += tl.load(res_ptr + rn, mask=live, other=0).to(tl.float32)
    out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, out, mask=live & (rn < SPLIT))
    tl.store(y2_ptr + (rn - SPLIT), out, mask=live & (rn >= SPLIT))

@triton.jit
def gemv_fp16_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, res_ptr, y_ptr, y2_ptr, N, K, SPLIT, ACT_FROM, eps,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACT: tl.constexpr, RES: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rn < N
    rk = tl.arange(0, BLOCK_K)
    mean, rstd = 0.0, 1.0
    if LN:
        mean, rstd = ln_stats(x_ptr, K, eps, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    rows = w_ptr + rn.to(tl.int64)[:, None] * K
    for k0 in tl.range(0, K, BLOCK_K):
        k = k0 + rk
        inside = k < K
        x = normed(x_ptr, lnw_ptr, lnb_ptr, k, inside, mean, rstd, LN)
        w = tl.load(rows + k[None, :], mask=live[:, None] & inside[None, :], other=0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    epilogue(tl.sum(acc, axis=1), rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)

@triton.jit
def gemv_int4_kernel(x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, lnw_ptr, lnb_ptr, res_ptr, y_ptr, y2_ptr, N, K2, G,
                     SPLIT, ACT_FROM, eps, BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
                     LN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr):
    # rows [pid * BLOCK_N, +BLOCK_N); each step NG groups of GROUP packed bytes per row (low nibble: column j,
    # high: column j + K2); the products accumulate elementwise in a (rows, groups, GROUP) tile, summed once at
    # the end (no reduction per step)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rn < N
    rg = tl.arange(0, NG)
    rj = tl.arange(0, GROUP)
    half = G // 2
    mean, rstd = 0.0, 1.0
    if LN:
        mean, rstd = ln_stats(x_ptr, 2 * K2, eps, 1024)
    acc = tl.zeros((BLOCK_N, NG, GROUP), dtype=tl.float32)
    rows = p_ptr + rn.to(tl.int64)[:, None, None] * K2
    srow = rn[:, None] * G
    for k0 in tl.range(0, K2, NG * GROUP):
        k = k0 + rg[:, None] * GROUP + rj[None, :]  # (NG, GROUP)
        inside = k < K2
        xl = normed(x_ptr, lnw_ptr, lnb_ptr, k, inside, mean, rstd, LN)
        xh = normed(x_ptr, lnw_ptr, lnb_ptr, K2 + k, inside, mean, rstd, LN)
        p = tl.load(rows + k[None, :, :], mask=live[:, None, None] & inside[None, :, :], other=0,
                    eviction_policy="evict_first").to(tl.int32)
        g = k0 // GROUP + rg
        m = live[:, None] & (g < half)[None, :]
        s_lo = tl.load(s_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)[:, :, None]
        s_hi = tl.load(s_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)[:, :, None]
        o_lo = tl.load(o_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)[:, :, None]
        o_hi = tl.load(o_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)[:, :, None]
        acc += ((p & 15).to(tl.float32) * s_lo - o_lo) * xl[None, :, :] \
            + ((p >> 4).to(tl.float32) * s_hi - o_hi) * xh[None, :, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)

@triton.jit
def attention_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, o_ptr, L, scale, H: tl.constexpr,
                     D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    h = tl.program_id(0)
    pos = tl.load(pos_ptr).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rot = d < R
    partner = tl.where(d < R // 2, d + R // 2, d - R // 2)
    sign = tl.where(d < R // 2, -1.0, 1.0)
    c = tl.load(cos_ptr + pos * R + d, mask=rot, other=1).to(tl.float32)
    s = tl.load(sin_ptr + pos * R + d, mask=rot, other=0).to(tl.float32)
    q = tl.load(qkv_ptr + h * D + d, mask=dm, other=0).to(tl.float32)
    qp = tl.load(qkv_ptr + h * D + partner, mask=rot, other=0).to(tl.float32)
    k = tl.load(qkv_ptr + H * D + h * D + d, mask=dm, other=0).to(tl.float32)
    kp = tl.load(qkv_ptr + H * D + h * D + partner, mask=rot, other=0).to(tl.float32)
    v = tl.load(qkv_ptr + 2 * H * D + h * D + d, mask=dm, other=0)
    q = tl.where(rot, q * c + sign * qp * s, q).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    k = tl.where(rot, k * c + sign * kp * s, k).to(kc_ptr.dtype.element_ty)
    base = h.to(tl.int64) * L * D
    tl.store(kc_ptr + base + pos * D + d, k, mask=dm)
    tl.store(vc_ptr + base + pos * D + d, v.to(vc_ptr.dtype.element_ty), mask=dm)
    # the new position from registers, the earlier ones from the cache (never read back what was just written)
    m = tl.sum(q * k.to(tl.float32), axis=0) * scale
    total = tl.full((), 1.0, tl.float32)
    acc = v.to(tl.float32)
    rt = tl.arange(0, BLOCK_T)
    for t0 in tl.range(0, pos, BLOCK_T):
        t = t0 + rt
        tm = t < pos
        offs = base + t[:, None] * D + d[None, :]
        keys = tl.load(kc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
        sc = tl.where(tm, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        vals = tl.load(vc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(o_ptr + h * D + d, (acc / total).to(o_ptr.dtype.element_ty), mask=dm)

gemv_fp16 = triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                                for bn in (1, 2, 4, 8) for bk in (256, 512, 1024) for w in (2, 4, 8)
                                if 8 <= bn * bk // (32 * w) <= 64],
                       key=["N", "K", "LN", "ACT", "RES"], restore_value=["y_ptr", "y2_ptr"])(gemv_fp16_kernel)
gemv_int4 = triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "NG": ng}, num_warps=w)
                                for bn in (1, 2, 4, 8, 16) for ng in (1, 2) for w in (2, 4, 8)
                                if 8 <= bn * ng * 128 // (32 * w) <= 64],
                       key=["N", "K2", "LN", "ACT", "RES"], restore_value=["y_ptr", "y2_ptr"])(gemv_int4_kernel)
