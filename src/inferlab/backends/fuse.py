"""One matrix multiply for an attention layer's q, k and v projections (`fuse_qkv`).

At batch 1 a small matrix-vector product reads its weights slower than a large one (H100: 1.7 TB/s
for Phi-2's 2560x2560, 2.4-2.6 TB/s for 2560x10240; docs/decode-loops.md), so three calls per
layer become one. The model's code stays as it is: the fused `q_proj` returns q and hands k and v
to `k_proj` and `v_proj`, called next; a model calling them in another order fails clearly.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache  # one set of classes: isinstance checks and torch.compile see the same types
def _modules():
    from torch import nn

    class FusedQKV(nn.Module):
        """q_proj of a fused projection: one matmul over [Wq; Wk; Wv], k and v handed on."""

        def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
            import torch

            super().__init__()
            bias = q.bias is not None
            out_features = q.out_features + k.out_features + v.out_features
            self.qkv = nn.Linear(q.in_features, out_features, bias=bias,
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
        """k_proj, v_proj (or a fused block's fc1): the part the fused q_proj computed."""

        def __init__(self, handed: dict[str, Any], part: str):
            super().__init__()
            self.handed, self.part = handed, part

        def forward(self, x):
            if self.part not in self.handed:
                raise RuntimeError(
                    f"fused projections: {self.part} was asked for before q_proj ran; this model "
                    "does not call its projections in the order fusing assumes (q, k, v, then the "
                    "MLP), so they cannot be fused"
                )
            return self.handed.pop(self.part)

    return FusedQKV, HandedProjection


def fuse_qkv(model) -> int:
    """Fuse the plain-Linear q/k/v projections of every attention module; returns how many.

    ValueError where none can be (another layout, or bitsandbytes weights: fuse first)."""
    from torch import nn

    fused_cls, handed_cls = _modules()
    n = 0
    for module in model.modules():
        parts = [getattr(module, f"{p}_proj", None) for p in "qkv"]
        if not all(type(p) is nn.Linear for p in parts):  # exact: not bitsandbytes' Linear4bit
            continue
        q, k, v = parts
        if len({p.in_features for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
            continue
        fused = fused_cls(q, k, v)
        module.q_proj = fused
        module.k_proj, module.v_proj = handed_cls(fused.handed, "k"), handed_cls(fused.handed, "v")
        n += 1
    if n == 0:
        raise ValueError(
            f"fuse_qkv: {type(model).__name__} has no attention module with q_proj, k_proj and "
            "v_proj as plain Linear layers (fusing applies to fp32/fp16/bf16 weights and to "
            "torchao's, which are quantized after fusing)"
        )
    return n


# The parallel block (`fuse_block`): Phi's layer is x + dense(attn(h)) + fc2(act(fc1(h))),
# h = ln(x), so [q; k; v; fc1] is one matrix over h and [dense | fc2] one over
# [attn, act(fc1(h))]: two larger matrix-vector products per layer instead of six. As for
# fuse_qkv the model's code stays: q_proj hands k, v and fc1's output on; dense keeps its
# input for fc2 and returns zeros. At one row, inductor turns MatVecLinear's torch.mm into a
# Triton reduction that takes the bias, activation and residual add (scripts/gemv_bench.py).


@functools.cache
def _block_modules():
    import torch
    from torch import nn

    class MatVecLinear(nn.Module):
        """x W^T + b as torch.mm and an add (not addmm, which inductor leaves to cuBLAS)."""

        def __init__(self, weight, bias):
            super().__init__()
            self.out_features, self.in_features = weight.shape
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

        kernel = "default"  # "triton": one row on CUDA runs kernels.py's GEMV (gemv: triton)

        def forward(self, x):
            x2 = x.reshape(-1, self.in_features)
            if self.kernel == "triton" and x2.shape[0] == 1 and x2.is_cuda:
                from inferlab.backends.kernels import gemv_fp16

                y = gemv_fp16(x2.contiguous(), self.weight, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            y = torch.mm(x2, self.weight.t())
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)

    class BlockInput(nn.Module):
        """q_proj of a fused block: one matmul over [Wq; Wk; Wv; Wfc1], the rest handed on."""

        def __init__(self, proj, sizes: list[int], handed: dict[str, Any]):
            super().__init__()
            self.proj, self.sizes, self.handed = proj, sizes, handed

        def forward(self, x):
            q, k, v, f = self.proj(x).split(self.sizes, dim=-1)
            self.handed["k"], self.handed["v"], self.handed["fc1"] = k, v, f
            return q

    class DeferredOutput(nn.Module):
        """The attention's output projection of a fused block: keeps its input for fc2."""

        def __init__(self, out_features: int, handed: dict[str, Any]):
            super().__init__()
            self.out_features, self.handed = out_features, handed

        def forward(self, x):
            self.handed["attn"] = x
            return x.new_zeros(*x.shape[:-1], self.out_features)

    class BlockOutput(nn.Module):
        """fc2 of a fused block: [Wdense | Wfc2] over [attention output, activated fc1 output]."""

        def __init__(self, proj, handed: dict[str, Any]):
            super().__init__()
            self.proj, self.handed = proj, handed

        def forward(self, g):
            if "attn" not in self.handed:
                raise RuntimeError(
                    "fuse_block: fc2 was called before the attention's output projection; this "
                    "layer does not run attention before its MLP, so its block cannot be fused"
                )
            return self.proj(torch.cat([self.handed.pop("attn"), g], dim=-1))

    return MatVecLinear, BlockInput, DeferredOutput, BlockOutput


def matvec_linear(linear):
    """A MatVecLinear with the weights of an nn.Linear (the same tensors, not copies)."""
    bias = linear.bias.data if linear.bias is not None else None
    return _block_modules()[0](linear.weight.data, bias)


def swap_children(root, swap) -> None:
    """Replace every module below `root` by `swap(module)` where that is another module."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None and new is not child:
                setattr(parent, name, new)


def _plain_linear(weight, bias):
    """An nn.Linear holding these tensors (what torchao's quantize_ converts)."""
    from torch import nn

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def parallel_blocks(model) -> list:
    """Layers whose attention and MLP read one normed input, all plain Linear: Phi's layout."""
    from torch import nn

    found = []
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(layer, "input_layernorm"):
            continue
        if hasattr(layer, "post_attention_layernorm"):  # attention, then MLP: sequential
            continue
        parts = [getattr(attn, f"{p}_proj", None) for p in "qkv"]
        parts += [getattr(attn, "dense", None), getattr(mlp, "fc1", None),
                  getattr(mlp, "fc2", None)]
        if all(type(p) is nn.Linear for p in parts):
            found.append(layer)
    return found


def fuse_parallel_block(model, matvec_projections: bool = True) -> int:
    """Fuse every parallel layer into two projections, the head a MatVecLinear; returns how many.

    ValueError where none can be (Llama's sequential layers, bitsandbytes weights). With
    matvec_projections=False they are nn.Linear (for torchao's quantize_) and the head stays."""
    import torch

    matvec, block_input, deferred, block_output = _block_modules()
    projection = matvec if matvec_projections else _plain_linear
    handed_cls = _modules()[1]
    layers = parallel_blocks(model)
    if not layers:
        raise ValueError(
            f"fuse_block: {type(model).__name__} has no parallel decoder layer (one input layer "
            "norm feeding self_attn with q_proj/k_proj/v_proj/dense and mlp with fc1/fc2 as "
            "plain Linear layers, as Phi has); sequential layers such as Llama's cannot be fused "
            "this way: use fuse_qkv"
        )
    with torch.no_grad():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            ins = [a.q_proj, a.k_proj, a.v_proj, m.fc1]
            w_in = torch.cat([p.weight for p in ins])
            b_in = torch.cat([
                p.bias if p.bias is not None else w_in.new_zeros(p.out_features) for p in ins
            ])
            w_out = torch.cat([a.dense.weight, m.fc2.weight], dim=1)
            b_out = sum(p.bias for p in (a.dense, m.fc2) if p.bias is not None)
            handed: dict[str, Any] = {}
            a.q_proj = block_input(projection(w_in, b_in), [p.out_features for p in ins], handed)
            a.k_proj, a.v_proj = handed_cls(handed, "k"), handed_cls(handed, "v")
            m.fc1 = handed_cls(handed, "fc1")
            a.dense = deferred(w_out.shape[0], handed)
            b_out = b_out if torch.is_tensor(b_out) else None
            m.fc2 = block_output(projection(w_out, b_out), handed)
        head = model.get_output_embeddings()
        if matvec_projections and type(head) is torch.nn.Linear:
            model.set_output_embeddings(matvec_linear(head))
    return len(layers)
