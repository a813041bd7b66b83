"""Triton matrix-vector kernels for batch-1 decoding (`gemv: triton` of a transformers point).

At batch 1 a projection's speed is the rate it reads its weights. On an H100 (Phi-2's shapes,
scripts/gemv_bench.py) cuBLAS read fp16 at 1.6-2.8 TB/s, one Triton row per program at
2.0-3.0 TB/s, tinygemm's int4 at 0.4-1.5 TB/s. torch.compile traces these kernels, so they run
inside the compiled step and its CUDA graph; block sizes are tuned on the first call.
"""

from __future__ import annotations


def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def interpreted() -> bool:
    """Whether Triton kernels run interpreted here (TRITON_INTERPRET=1): on the CPU, slowly."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    """The two kernels, autotuned on each shape's first call; `.fn` of each is the plain kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_fp16_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, BLOCK_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        # one program per output row, reading it in chunks of BLOCK_K; fp32 accumulation
        row = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        base = w_ptr + row.to(tl.int64) * K
        for k0 in tl.range(0, K, BLOCK_K):
            inside = k0 + rk < K
            x = tl.load(x_ptr + k0 + rk, mask=inside, other=0).to(tl.float32)
            w = tl.load(base + k0 + rk, mask=inside, other=0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x
        y = tl.sum(acc, axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + row).to(tl.float32)
        tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def gemv_int4_kernel(x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, y_ptr, N, K2, G, BLOCK_N: tl.constexpr,
                         NG: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr):
        # Int4Linear's layout: rows [pid * BLOCK_N, +BLOCK_N), NG groups of GROUP bytes per step;
        # K2 = bytes per row (K / 2); G = groups per row: the first G / 2 low nibbles, then high
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rn < N
        rk = tl.arange(0, NG * GROUP)
        rg = tl.arange(0, NG)
        half = G // 2
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
        rows = p_ptr + rn.to(tl.int64)[:, None] * K2
        srow = rn[:, None] * G
        for k0 in tl.range(0, K2, NG * GROUP):
            k = k0 + rk
            kin = k < K2
            p = tl.load(rows + k[None, :], mask=live[:, None] & kin[None, :], other=0,
                        eviction_policy="evict_first").to(tl.int32)
            xl = tl.load(x_ptr + k, mask=kin, other=0).to(tl.float32)
            xh = tl.load(x_ptr + K2 + k, mask=kin, other=0).to(tl.float32)
            shape = (BLOCK_N, NG, GROUP)
            lo = tl.sum(tl.reshape((p & 15).to(tl.float32) * xl[None, :], shape), axis=2)
            hi = tl.sum(tl.reshape((p >> 4).to(tl.float32) * xh[None, :], shape), axis=2)
            sxl = tl.sum(tl.reshape(xl, (NG, GROUP)), axis=1)
            sxh = tl.sum(tl.reshape(xh, (NG, GROUP)), axis=1)
            g = k0 // GROUP + rg
            m = live[:, None] & (g < half)[None, :]
            s_lo = tl.load(s_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)
            s_hi = tl.load(s_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)
            o_lo = tl.load(o_ptr + srow + g[None, :], mask=m, other=0).to(tl.float32)
            o_hi = tl.load(o_ptr + srow + half + g[None, :], mask=m, other=0).to(tl.float32)
            acc += s_lo * lo - o_lo * sxl[None, :] + s_hi * hi - o_hi * sxh[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=live, other=0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=live)

    fp16 = triton.autotune(
        configs=[triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
                 for bk in (256, 512, 1024) for w in (1, 2, 4) for st in (1, 3) if bk >= 256 * w],
        key=["N", "K"])(gemv_fp16_kernel)
    # int4: rows per program x groups per step x warps x stages, 4 to 32 bytes per thread and step
    int4 = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "NG": ng}, num_warps=w, num_stages=st)
                 for bn in (1, 2, 4, 8) for ng in (1, 2, 4) for w in (2, 4, 8) for st in (1, 3)
                 if 4 <= bn * ng * 128 // (32 * w) <= 32],
        key=["N", "K2"])(gemv_int4_kernel)
    return fp16, int4


_TUNED: tuple | None = None  # set by prepare(), outside torch.compile: forwards only launch


def prepare() -> None:
    """Build the tuned kernels once, before a model that uses them is compiled."""
    global _TUNED
    if _TUNED is None:
        _TUNED = _kernels()


def gemv_fp16(x, w, b=None):
    """y (1, N) = x (1, K) @ w (N, K)^T + b."""
    import torch

    n, k = w.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _TUNED[0][(n,)](x, w, b if b is not None else w, y, n, k, HAS_BIAS=b is not None)
    return y


def gemv_int4(x, packed, scale, offset, b, group: int):
    """y (1, N) = x (1, K) @ dequantized(packed)^T + b over Int4Linear's layout."""
    import torch

    n, k2 = packed.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _TUNED[1][lambda meta: ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)](
        x, packed, scale, offset, b if b is not None else scale, y, n, k2, scale.shape[1],
        GROUP=group, HAS_BIAS=b is not None)
    return y
