"""One matrix multiply for an attention layer's q, k and v projections (`fuse_qkv` of a transformers point).

At batch 1 a decode step reads every weight once, and a small matrix-vector product reads its weights slower than a
large one: on an H100, cuBLAS read Phi-2's 2560x2560 projections at 1.7 TB/s and its 2560x10240 MLP matrices at
2.4-2.6 TB/s, and torchao's int4 kernel costs about 5 us per call whatever its size (docs/decode-loops.md). Fusing
q, k and v turns three calls per layer into one over the concatenated weights.

The model's own attention code stays as it is: `q_proj` becomes the fused projection, which returns q and hands k
and v to `k_proj` and `v_proj`, called next on the same input. This holds for the attention modules of Phi, Llama,
Mistral, Qwen2 and the like (q, then k, then v); a model that calls them in another order fails with a clear error
instead of computing something else. torch.compile traces through the hand-over (fullgraph).
"""

from __future__ import annotations

from typing import Any


def _modules():
    from torch import nn

    class FusedQKV(nn.Module):
        """q_proj of a fused projection: one matmul over [Wq; Wk; Wv], k and v left for the next two calls."""

        def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
            import torch

            super().__init__()
            bias = q.bias is not None
            self.qkv = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=bias,
                                 device=q.weight.device, dtype=q.weight.dtype)
            with torch.no_grad():
                self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                if bias:
                    self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            self.sizes = [q.out_features, k.out_features, v.out_features]
            self.handed: dict[str, Any] = {}

        def forward(self, x):
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
            self.handed["k"], self.handed["v"] = k, v
            return q

    class HandedProjection(nn.Module):
        """k_proj or v_proj of a fused projection: the part the fused q_proj computed from the same input."""

        def __init__(self, handed: dict[str, Any], part: str):
            super().__init__()
            self.handed, self.part = handed, part

        def forward(self, x):
            if self.part not in self.handed:
                raise RuntimeError(f"fuse_qkv: {self.part}_proj was called before q_proj; this model's attention "
                                   "does not call q, k and v in that order, so its projections cannot be fused")
            return self.handed.pop(self.part)

    return FusedQKV, HandedProjection


def fuse_qkv(model) -> int:
    """Fuse q_proj / k_proj / v_proj of every attention module that has them as plain Linear layers on the same
    input size; returns how many were fused. Raises ValueError where none can be (another attention layout, or
    weights already quantized by bitsandbytes: fuse before quantizing)."""
    from torch import nn

    fused_cls, handed_cls = _modules()
    n = 0
    for module in model.modules():
        parts = [getattr(module, f"{p}_proj", None) for p in "qkv"]
        if not all(type(p) is nn.Linear for p in parts):  # exact type: not bitsandbytes' Linear4bit / Linear8bitLt
            continue
        q, k, v = parts
        if len({p.in_features for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
            continue
        fused = fused_cls(q, k, v)
        module.q_proj = fused
        module.k_proj, module.v_proj = handed_cls(fused.handed, "k"), handed_cls(fused.handed, "v")
        n += 1
    if n == 0:
        raise ValueError(f"fuse_qkv: {type(model).__name__} has no attention module with q_proj, k_proj and v_proj "
                         "as plain Linear layers (fusing applies to fp32/fp16/bf16 weights and to torchao's, which "
                         "are quantized after fusing)")
    return n
