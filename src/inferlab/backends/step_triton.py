"""The Triton kernels of `decode: kernels`; torch references and wrappers: step_kernels.py.

The GEMVs keep backends/kernels.py's inner loops (85 % of copy bandwidth in fp16 on an H200)
plus an epilogue. Autotuning times each shape's first call, before graph capture, restoring
the outputs after each trial since the residual is added in place.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, h_ptr, K, eps, BLOCK: tl.constexpr):
    """h = LayerNorm(x) of one row (one program), rounded to h's dtype."""
    k = tl.arange(0, BLOCK)
    inside = k < K
    x = tl.load(x_ptr + k, mask=inside, other=0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    c = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / K + eps)
    h = c * rstd * tl.load(w_ptr + k, mask=inside, other=0).to(tl.float32) \
        + tl.load(b_ptr + k, mask=inside, other=0).to(tl.float32)
    tl.store(h_ptr + k, h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, h_ptr, K, eps, BLOCK: tl.constexpr):
    """h = w * round(x / rms(x)) of one row (one program): Llama's RMSNorm, rounded as it rounds."""
    k = tl.arange(0, BLOCK)
    inside = k < K
    x = tl.load(x_ptr + k, mask=inside, other=0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
    n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    h = tl.load(w_ptr + k, mask=inside, other=0).to(tl.float32) * n
    tl.store(h_ptr + k, h.to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def rms_rstd(x_ptr, K, eps, BLOCK: tl.constexpr):
    """1 / rms(x) of the row x (K,), in chunks of BLOCK: a GEMV's RMSNorm prologue."""
    r = tl.arange(0, BLOCK)
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK):
        xs = tl.load(x_ptr + k0 + r, mask=k0 + r < K, other=0).to(tl.float32)
        ss += xs * xs
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def rms_apply(x, rstd, nw, x_ptr):
    """rms_norm_kernel's function on loaded values x, given their row's rstd and the weights nw."""
    dtype = x_ptr.dtype.element_ty
    n = (x * rstd).to(dtype).to(tl.float32)
    return (nw * n).to(dtype).to(tl.float32)


@triton.jit
def glu(g, u, y_ptr):
    """SiLU(g) * u from fp32 sums, rounded to y's dtype where Llama's MLP rounds."""
    dtype = y_ptr.dtype.element_ty
    g = g.to(dtype).to(tl.float32)
    u = u.to(dtype).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return a * u


@triton.jit
def epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM,
             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr):
    """Bias, GELU (tanh) on the rows from ACT_FROM, the residual; rows below SPLIT to y, the rest to y2."""
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
def gemv_fp16_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, y2_ptr, N, K, SPLIT, ACT_FROM, nw_ptr, eps,
                     BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     RES: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr):
    # GLU: the weight is [gate; up]; program i reads rows i and N + i, writes SiLU(gate) * up
    # NORM: x is RMSNorm(x) with weights nw (Llama's norm in the prologue: one launch fewer)
    row = tl.program_id(0)
    if NORM:
        rstd = rms_rstd(x_ptr, K, eps, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    base = w_ptr + row.to(tl.int64) * K
    base2 = w_ptr + (row + N).to(tl.int64) * K
    for k0 in tl.range(0, K, BLOCK_K):
        inside = k0 + rk < K
        x = tl.load(x_ptr + k0 + rk, mask=inside, other=0).to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + k0 + rk, mask=inside, other=0).to(tl.float32)
            x = rms_apply(x, rstd, nw, x_ptr)
        w = tl.load(base + k0 + rk, mask=inside, other=0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x
        if GLU:
            w2 = tl.load(base2 + k0 + rk, mask=inside, other=0, eviction_policy="evict_first")
            acc2 += w2.to(tl.float32) * x
    y = tl.sum(acc, axis=0)
    if GLU:
        y = glu(y, tl.sum(acc2, axis=0), y_ptr)
    epilogue(y, row, row < N, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)


@triton.jit
def scaled(s_ptr, o_ptr, rn, g, m, lo, hi, sxl, sxh, half, G):
    """Sums lo, hi (rows rn, groups g) with each group's scale and offset applied, masked by m."""
    srow = rn[:, None] * G
    s_lo = tl.load(s_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)
    s_hi = tl.load(s_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)
    o_lo = tl.load(o_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)
    o_hi = tl.load(o_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)
    return s_lo * lo - o_lo * sxl[None, :] + s_hi * hi - o_hi * sxh[None, :]


@triton.jit
def int4_part(p_ptr, s_ptr, o_ptr, rn, live, k, kin, xl, xh, sxl, sxh, g, half, K2, G,
              BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr):
    """Rows rn's partial sums (BLOCK_N, NG) over the packed bytes k of one step."""
    p = tl.load(p_ptr + rn.to(tl.int64)[:, None] * K2 + k[None, :], mask=live[:, None] & kin[None, :],
                other=0, eviction_policy="evict_first").to(tl.int32)
    lo = tl.sum(tl.reshape((p & 15).to(tl.float32) * xl[None, :], (BLOCK_N, NG, GROUP)), axis=2)
    hi = tl.sum(tl.reshape((p >> 4).to(tl.float32) * xh[None, :], (BLOCK_N, NG, GROUP)), axis=2)
    m = live[:, None] & (g < half)[None, :]
    return scaled(s_ptr, o_ptr, rn, g, m, lo, hi, sxl, sxh, half, G)


@triton.jit
def gemv_int4_kernel(x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, res_ptr, y_ptr, y2_ptr, N, K2, G, SPLIT,
                     ACT_FROM, nw_ptr, eps, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     RES: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr):
    # rows [pid * BLOCK_N, +BLOCK_N), NG groups of GROUP bytes per step; K2 = bytes per row (K / 2)
    # G = groups per row (K / GROUP): the first G / 2 low nibbles, the rest high; GLU: rows N + rn too
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rn < N
    rk = tl.arange(0, NG * GROUP)
    rg = tl.arange(0, NG)
    half = G // 2
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    if NORM:
        rstd = rms_rstd(x_ptr, 2 * K2, eps, NG * GROUP)
    for k0 in tl.range(0, K2, NG * GROUP):
        k = k0 + rk
        kin = k < K2
        xl = tl.load(x_ptr + k, mask=kin, other=0).to(tl.float32)
        xh = tl.load(x_ptr + K2 + k, mask=kin, other=0).to(tl.float32)
        if NORM:
            nwl = tl.load(nw_ptr + k, mask=kin, other=0).to(tl.float32)
            nwh = tl.load(nw_ptr + K2 + k, mask=kin, other=0).to(tl.float32)
            xl = rms_apply(xl, rstd, nwl, x_ptr)
            xh = rms_apply(xh, rstd, nwh, x_ptr)
        sxl = tl.sum(tl.reshape(xl, (NG, GROUP)), axis=1)
        sxh = tl.sum(tl.reshape(xh, (NG, GROUP)), axis=1)
        g = k0 // GROUP + rg
        acc += int4_part(p_ptr, s_ptr, o_ptr, rn, live, k, kin, xl, xh, sxl, sxh, g, half, K2, G,
                         BLOCK_N, NG, GROUP)
        if GLU:
            acc2 += int4_part(p_ptr, s_ptr, o_ptr, rn + N, live, k, kin, xl, xh, sxl, sxh, g, half,
                              K2, G, BLOCK_N, NG, GROUP)
    y = tl.sum(acc, axis=1)
    if GLU:
        y = glu(y, tl.sum(acc2, axis=1), y_ptr)
    epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)


@triton.jit
def int4_groups(p_ptr, s_ptr, o_ptr, rn, live, g, gm, k, xl, xh, sxl, sxh, half, K2, G):
    """Rows rn's sums (BLOCK_N, NG) over groups g of both halves of the row.

    The bytes k (NG, GROUP) load as one 3-D block (no reshape)."""
    m3 = live[:, None, None] & gm[None, :, None]
    p = tl.load(p_ptr + rn.to(tl.int64)[:, None, None] * K2 + k[None, :, :], mask=m3, other=0,
                eviction_policy="evict_first").to(tl.int32)
    lo = tl.sum((p & 15).to(tl.float32) * xl[None, :, :], axis=2)
    hi = tl.sum((p >> 4).to(tl.float32) * xh[None, :, :], axis=2)
    m = live[:, None] & gm[None, :]
    return scaled(s_ptr, o_ptr, rn, g, m, lo, hi, sxl, sxh, half, G)


@triton.jit
def gemv_int4_splitk_kernel(x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, res_ptr, y_ptr, y2_ptr, part_ptr,
                            count_ptr, N, K2, G, SPLIT, ACT_FROM, nw_ptr, eps,
                            BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
                            SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                            RES: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr):
    """gemv_int4_kernel's function (`int4_gemv: splitk`); program (b, s): rows of block b, slice s.

    With SPLIT_K > 1 the slices add into part (fp32, zero between launches) atomically; the
    block's last slice (count) runs the epilogue and zeroes part and count again: the fp32
    sums add in whichever order the slices finish."""
    b = tl.program_id(0)
    sid = tl.program_id(1)
    rn = b * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rn < N
    rg = tl.arange(0, NG)
    rj = tl.arange(0, GROUP)
    half = G // 2
    per = tl.cdiv(half, SPLIT_K)
    g_end = tl.minimum(per * (sid + 1), half)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    if NORM:
        rstd = rms_rstd(x_ptr, 2 * K2, eps, NG * GROUP)
    for g0 in tl.range(per * sid, g_end, NG):
        g = g0 + rg
        gm = g < g_end
        k = g[:, None] * GROUP + rj[None, :]
        xl = tl.load(x_ptr + k, mask=gm[:, None], other=0).to(tl.float32)
        xh = tl.load(x_ptr + K2 + k, mask=gm[:, None], other=0).to(tl.float32)
        if NORM:
            nwl = tl.load(nw_ptr + k, mask=gm[:, None], other=0).to(tl.float32)
            nwh = tl.load(nw_ptr + K2 + k, mask=gm[:, None], other=0).to(tl.float32)
            xl = rms_apply(xl, rstd, nwl, x_ptr)
            xh = rms_apply(xh, rstd, nwh, x_ptr)
        sxl = tl.sum(xl, axis=1)
        sxh = tl.sum(xh, axis=1)
        acc += int4_groups(p_ptr, s_ptr, o_ptr, rn, live, g, gm, k, xl, xh, sxl, sxh, half, K2, G)
        if GLU:
            acc2 += int4_groups(p_ptr, s_ptr, o_ptr, rn + N, live, g, gm, k, xl, xh, sxl, sxh,
                                half, K2, G)
    y = tl.sum(acc, axis=1)
    y2 = tl.sum(acc2, axis=1)
    if SPLIT_K > 1:
        tl.atomic_add(part_ptr + rn, y, mask=live)
        if GLU:
            tl.atomic_add(part_ptr + N + rn, y2, mask=live)
        tl.debug_barrier()  # every thread's partial sums before the count that publishes them
        # the last slice reads the totals from L2, where the atomics added them
        if tl.atomic_add(count_ptr + b, 1) == SPLIT_K - 1:
            zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
            y = tl.load(part_ptr + rn, mask=live, other=0, cache_modifier=".cg")
            tl.store(part_ptr + rn, zero, mask=live)
            if GLU:
                y2 = tl.load(part_ptr + N + rn, mask=live, other=0, cache_modifier=".cg")
                tl.store(part_ptr + N + rn, zero, mask=live)
                y = glu(y, y2, y_ptr)
            tl.store(count_ptr + b, 0)
            epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)
    else:
        if GLU:
            y = glu(y, y2, y_ptr)
        epilogue(y, rn, live, b_ptr, res_ptr, y_ptr, y2_ptr, SPLIT, ACT_FROM, HAS_BIAS, ACT, RES)


@triton.jit
def rotary_query(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, h, D, R, BLOCK_D: tl.constexpr):
    """Query head h with rotary applied (rounded to qkv's dtype), and the lanes and cos/sin it used."""
    pos = tl.load(pos_ptr).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rot = d < R
    partner = tl.where(d < R // 2, d + R // 2, d - R // 2)
    sign = tl.where(d < R // 2, -1.0, 1.0)
    cs = tl.load(cos_ptr + pos * R + d, mask=rot, other=1).to(tl.float32)
    sn = tl.load(sin_ptr + pos * R + d, mask=rot, other=0).to(tl.float32)
    q = tl.load(qkv_ptr + h * D + d, mask=dm, other=0).to(tl.float32)
    qp = tl.load(qkv_ptr + h * D + partner, mask=rot, other=0).to(tl.float32)
    q = tl.where(rot, q * cs + sign * qp * sn, q).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    return pos, d, dm, rot, partner, sign, cs, sn, q


@triton.jit
def attention_part_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                          L, S, scale, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                          R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (head h, chunk c): softmax statistics of q over positions [c BLOCK_T, +BLOCK_T).

    The chunk holding pos also writes the new k, v (rotary applied), weighing them from registers;
    query head h reads key/value head h // (H / KV), written by the group's first head."""
    h = tl.program_id(0)
    c = tl.program_id(1)
    kv = h // (H // KV)
    pos, d, dm, rot, partner, sign, cs, sn, q = rotary_query(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, h, D, R, BLOCK_D
    )
    base = kv.to(tl.int64) * L * D
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < pos
    offs = base + t[:, None] * D + d[None, :]
    keys = tl.load(kc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
    vals = tl.load(vc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
    sc = tl.where(tm, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
    mine = (tl.zeros((BLOCK_D,), dtype=tl.int32) + pos // BLOCK_T) == c  # holds the new position
    k = tl.load(qkv_ptr + H * D + kv * D + d, mask=dm & mine, other=0).to(tl.float32)
    kp = tl.load(qkv_ptr + H * D + kv * D + partner, mask=rot & mine, other=0).to(tl.float32)
    v = tl.load(qkv_ptr + (H + KV) * D + kv * D + d, mask=dm & mine, other=0)
    k = tl.where(rot, k * cs + sign * kp * sn, k).to(kc_ptr.dtype.element_ty)
    first = (tl.zeros((BLOCK_D,), dtype=tl.int32) + h % (H // KV)) == 0  # the group's first head
    writer = mine & first
    tl.store(kc_ptr + base + pos * D + d, k, mask=dm & writer)
    tl.store(vc_ptr + base + pos * D + d, v.to(vc_ptr.dtype.element_ty), mask=dm & writer)
    s_new = tl.sum(q * k.to(tl.float32), axis=0) * scale
    s_new = tl.where(pos // BLOCK_T == c, s_new, float("-inf"))
    m = tl.maximum(tl.max(sc, axis=0), s_new)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk past pos: nothing to weigh
    p = tl.exp(sc - m_safe)
    p_new = tl.exp(s_new - m_safe)
    acc = tl.sum(p[:, None] * vals, axis=0) + p_new * v.to(tl.float32)
    i = h * S + c
    tl.store(m_ptr + i, m)
    tl.store(l_ptr + i, tl.sum(p, axis=0) + p_new)
    tl.store(acc_ptr + i * BLOCK_D + d, acc)


@triton.jit
def attention_one_kernel(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, o_ptr, L, scale,
                         H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program h: query head h over the whole cache in one launch (`fuse_attention`).

    The new k, v are weighed from registers first, then the cache with an online softmax.
    No second kernel, but only H programs: for short caches."""
    h = tl.program_id(0)
    kv = h // (H // KV)
    pos, d, dm, rot, partner, sign, cs, sn, q = rotary_query(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, h, D, R, BLOCK_D
    )
    k = tl.load(qkv_ptr + H * D + kv * D + d, mask=dm, other=0).to(tl.float32)
    kp = tl.load(qkv_ptr + H * D + kv * D + partner, mask=rot, other=0).to(tl.float32)
    v = tl.load(qkv_ptr + (H + KV) * D + kv * D + d, mask=dm, other=0)
    k = tl.where(rot, k * cs + sign * kp * sn, k).to(kc_ptr.dtype.element_ty)
    base = kv.to(tl.int64) * L * D
    first = (tl.zeros((BLOCK_D,), dtype=tl.int32) + h % (H // KV)) == 0  # the group's first head
    writer = dm & first
    tl.store(kc_ptr + base + pos * D + d, k, mask=writer)
    tl.store(vc_ptr + base + pos * D + d, v.to(vc_ptr.dtype.element_ty), mask=writer)
    m = tl.sum(q * k.to(tl.float32), axis=0) * scale  # running max, from the new position's score
    total = m * 0.0 + 1.0
    acc = v.to(tl.float32)
    for t0 in tl.range(0, pos, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < pos
        offs = base + t[:, None] * D + d[None, :]
        keys = tl.load(kc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
        vals = tl.load(vc_ptr + offs, mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)
        sc = tl.where(tm, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        total = total * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
        m = m_new
    tl.store(o_ptr + h * D + d, (acc / total).to(o_ptr.dtype.element_ty), mask=dm)


@triton.jit
def attention_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, S, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program h: the head's output from its chunks' statistics (the flash-decoding reduction)."""
    h = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    sm = s < S
    d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + h * S + s, mask=sm, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))
    w = tl.where(sm & (m > float("-inf")), w, 0.0)
    total = tl.sum(w * tl.load(l_ptr + h * S + s, mask=sm, other=0), axis=0)
    acc = tl.load(acc_ptr + (h * S + s)[:, None] * BLOCK_D + d[None, :], mask=sm[:, None], other=0)
    o = tl.sum(w[:, None] * acc, axis=0) / total
    tl.store(o_ptr + h * D + d, o.to(o_ptr.dtype.element_ty), mask=d < D)


FLAGS = ["ACT", "RES", "GLU", "NORM"]  # the epilogue's and prologue's switches: each its own tuning
gemv_fp16 = triton.autotune(
    configs=[triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bk in (256, 512, 1024) for w in (1, 2, 4) for st in (1, 3) if bk >= 256 * w],
    key=["N", "K", *FLAGS], restore_value=["y_ptr", "y2_ptr"])(gemv_fp16_kernel)
# int4: rows per program x groups per step x warps x stages, 4 to 32 packed bytes per thread and step
gemv_int4 = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "NG": ng}, num_warps=w, num_stages=st)
             for bn in (1, 2, 4, 8) for ng in (1, 2, 4) for w in (2, 4, 8) for st in (1, 3)
             if 4 <= bn * ng * 128 // (32 * w) <= 32],
    key=["N", "K2", *FLAGS], restore_value=["y_ptr", "y2_ptr"])(gemv_int4_kernel)
# int4, split-K: 27 configurations, each compiled on a shape's first call (in the step's warm-up);
# the slices fill the GPU for shapes with too few row blocks
gemv_int4_splitk = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "NG": ng, "SPLIT_K": sk}, num_warps=4, num_stages=3)
             for bn in (4, 8, 16) for ng in (2, 4, 8) for sk in (1, 2, 4)],
    key=["N", "K2", *FLAGS], restore_value=["y_ptr", "y2_ptr"])(gemv_int4_splitk_kernel)
