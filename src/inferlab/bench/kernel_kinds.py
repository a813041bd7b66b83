"""What kind of work a GPU kernel does, from its name (attention, matmul, fused Triton, copy,
other): how a decode profile splits its time (bench/profile.py). Profiles recorded before the fp16
GEMV below was classed are corrected when read (records.upgrade)."""

from __future__ import annotations

import re

# first match wins; names of cuBLAS / CUTLASS / Triton / torchao / bitsandbytes kernels, and this
# project's Triton GEMVs (backends/kernels.py; the fp16 one was named fp16_kernel in the records of
# 770803e)
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention|softmax", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|sm\d+_|cublas|matmul|_mm_|mm_kernel|addmm|linear|tinygemm|"
                          r"int4|int8|kgemm|kdequant|splitk|dot|^fp16_kernel$", re.I)),
    ("fused (Triton)", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|cat|index|scatter|gather", re.I)),
)


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other"
