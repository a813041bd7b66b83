"""Triton matrix-vector kernels for batch-1 decoding (`gemv: triton` of a transformers point).

At batch 1 a projection reads its weight matrix once per token and does two flops per weight read, so its speed is
the rate it reads the matrix at. scripts/gemv_bench.py measured on an H100 (Phi-2's shapes, weights out of L2):
cuBLAS reads fp16 matrices at 1.6-2.8 TB/s, a plain Triton kernel with one output row per program at 2.0-3.0 TB/s,
and torchao's int4 kernel (tinygemm) reads its packed weights at 0.4-1.5 TB/s. These are those kernels:

- `gemv_fp16(x, w, b)`: y = w @ x + b for one row x, in fp16 or bf16, fp32 accumulation; one program per output
  row, reading the row in chunks (256-1024, tuned per shape).
- `gemv_int4(x, packed, scale, offset, b, group)`: the same over Int4Linear's layout (backends/int4.py): byte j of a
  row holds column j (low nibble) and column j + K/2 (high nibble), w = q * scale - offset per group of columns.
  Each program reads a block of rows a group at a time and applies the group's scale to the group's partial sum.

torch.compile traces calls to user-defined Triton kernels, so both run inside the compiled step and its CUDA graph.
They need CUDA and Triton; `available()` says whether this process has both. Block sizes are tuned per shape by
triton.autotune on the first call (the cold request), never inside a CUDA graph capture.
"""

from __future__ import annotations

import functools


def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernels(tuned: bool = True):
    """The two kernels; `tuned` wraps them in triton.autotune (block sizes picked by timing on the first call of each
    shape, before any CUDA graph is captured). Untuned, the caller passes the block sizes (tests, interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fp16_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        row = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        base = w_ptr + row.to(tl.int64) * K
        for k0 in tl.range(0, K, BLOCK_K):
            inside = k0 + rk < K
            x = tl.load(x_ptr + k0 + rk, mask=inside, other=0).to(tl.float32)
            w = tl.load(base + k0 + rk, mask=inside, other=0, eviction_policy="evict_first").to(tl.float32)
            acc += w * x
        y = tl.sum(acc, axis=0)
        if HAS_BIAS:
            y += tl.load(b_ptr + row).to(tl.float32)
        tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def int4_kernel(x_ptr, p_ptr, s_ptr, o_ptr, b_ptr, y_ptr, N, K2, G, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        # rows [pid * BLOCK_N, +BLOCK_N); K2 = bytes per row (K / 2); G = groups per row (K / GROUP)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rn < N
        rk = tl.arange(0, GROUP)
        half = G // 2
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        rows = p_ptr + rn.to(tl.int64)[:, None] * K2
        for g in tl.range(0, half):
            k = g * GROUP + rk
            p = tl.load(rows + k[None, :], mask=live[:, None], other=0, eviction_policy="evict_first").to(tl.int32)
            xl = tl.load(x_ptr + k).to(tl.float32)
            xh = tl.load(x_ptr + K2 + k).to(tl.float32)
            dot_lo = tl.sum((p & 15).to(tl.float32) * xl[None, :], axis=1)
            dot_hi = tl.sum((p >> 4).to(tl.float32) * xh[None, :], axis=1)
            s_lo = tl.load(s_ptr + rn * G + g, mask=live, other=0).to(tl.float32)
            s_hi = tl.load(s_ptr + rn * G + half + g, mask=live, other=0).to(tl.float32)
            o_lo = tl.load(o_ptr + rn * G + g, mask=live, other=0).to(tl.float32)
            o_hi = tl.load(o_ptr + rn * G + half + g, mask=live, other=0).to(tl.float32)
            acc += s_lo * dot_lo - o_lo * tl.sum(xl, axis=0) + s_hi * dot_hi - o_hi * tl.sum(xh, axis=0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=live, other=0).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=live)

    if not tuned:
        return fp16_kernel, int4_kernel
    fp16 = triton.autotune(configs=[triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
                                    for bk in (256, 512, 1024) for w in (1, 2, 4) for st in (1, 3)
                                    if bk >= 256 * w],
                           key=["N", "K"])(fp16_kernel)
    int4 = triton.autotune(configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
                                    for bn in (1, 2, 4, 8, 16) for w in (1, 2, 4) for st in (1, 2, 3)
                                    if bn * 128 >= 32 * w * 4],
                           key=["N", "K2"])(int4_kernel)
    return fp16, int4


_TUNED: tuple | None = None  # set by prepare(), outside torch.compile: the forward passes only launch


def prepare() -> None:
    """Build the tuned kernels once, before a model that uses them is compiled."""
    global _TUNED
    if _TUNED is None:
        _TUNED = _kernels(True)


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
        x, packed, scale, offset, b if b is not None else scale, y, n, k2, scale.shape[1], GROUP=group,
        HAS_BIAS=b is not None)
    return y
