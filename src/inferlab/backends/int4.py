"""int4 weight-only quantization whose batch-1 kernel inductor writes (`int4-inductor`).

Also the group sizes of both int4 paths (this one and torchao's `int4-ao`). Asymmetric groups
(w ~ q * scale - offset, q in 0..15, as tinygemm and HQQ), two per byte: byte j holds column j
low and j + K/2 high, so unpacking needs no interleave. At one row the product is plain tensor
arithmetic that torch.compile makes one Triton reduction; more rows dequantize and use torch.mm.
On Phi-2's shapes (H100) tinygemm and GemLite read 0.4-1.6 TB/s (scripts/gemv_bench.py): this
path measures what a bandwidth-bound reduction does instead.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

GROUP_SIZES = (128, 64, 32)


@functools.cache
def _module():
    import torch
    from torch import nn

    class Int4Linear(nn.Module):
        def __init__(self, weight, bias, group_size: int):
            super().__init__()
            n, k = weight.shape
            self.out_features, self.in_features, self.group_size = n, k, group_size
            w = weight.detach().float().view(n, k // group_size, group_size)
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            zero = -lo / scale
            q = torch.clamp(torch.round(w / scale + zero), 0, 15).to(torch.uint8).view(n, k)
            half = k // 2
            self.register_buffer("packed", (q[:, :half] | (q[:, half:] << 4)).contiguous())
            dtype = weight.dtype
            # (n, groups): lower half, then upper; w = q * scale - offset
            self.register_buffer("scale", scale.view(n, -1).to(dtype))
            self.register_buffer("offset", (scale * zero).view(n, -1).to(dtype))
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            else:
                self.bias = None

        def _halves(self, dtype):
            n, g = self.out_features, self.group_size
            p = self.packed.view(n, -1, g)  # (n, groups per half, g)
            s = self.scale.view(n, 2, -1, 1).to(dtype)
            o = self.offset.view(n, 2, -1, 1).to(dtype)
            lo = (p & 15).to(dtype) * s[:, 0] - o[:, 0]
            hi = (p >> 4).to(dtype) * s[:, 1] - o[:, 1]
            return lo, hi

        def dequantize(self, dtype=None):
            lo, hi = self._halves(dtype or self.scale.dtype)
            n = self.out_features
            return torch.cat([lo.reshape(n, -1), hi.reshape(n, -1)], dim=1)

        kernel = "default"  # "triton": one row on CUDA runs kernels.py's int4 GEMV (gemv: triton)

        def forward(self, x):
            x2 = x.reshape(-1, self.in_features)
            if self.kernel == "triton" and x2.shape[0] == 1 and x2.is_cuda:
                from inferlab.backends.kernels import gemv_int4

                y = gemv_int4(x2.contiguous(), self.packed, self.scale, self.offset, self.bias,
                              self.group_size)
                return y.view(*x.shape[:-1], self.out_features)
            if x2.shape[0] == 1:  # one row: inductor makes it one kernel over the packed bytes
                lo, hi = self._halves(x.dtype)
                xs = x2.view(2, -1, self.group_size)
                y = (lo * xs[0] + hi * xs[1]).sum(dim=(1, 2), dtype=torch.float32)
                y = y.to(x.dtype).view(1, -1)
            else:
                y = torch.mm(x2, self.dequantize(x.dtype).t())
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"group_size={self.group_size}")

    return Int4Linear


def group_size_for(in_features: int) -> int | None:
    """int4-inductor's group: the largest of 128, 64, 32 dividing half a row, or None (576: 32).

    Its packing puts column j and column j + K/2 in one byte."""
    return next((g for g in GROUP_SIZES if in_features % (2 * g) == 0), None)


def torchao_group_size(in_features: int) -> int | None:
    """torchao int4's group: the largest of 128, 64, 32 dividing the row (576: 64).

    torchao leaves a layer its group does not divide in 16 bits, saying so only at level INFO."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def group_sizes(model) -> dict[str, int]:
    """Projections per int4 group size as the model holds them (both paths): {"32": 180, ...}."""
    sizes: Counter = Counter()
    for m in model.modules():
        if type(m) is _module():
            sizes[m.group_size] += 1
        elif hasattr(getattr(m, "weight", None), "block_size"):  # a torchao quantized weight
            sizes[m.weight.block_size[-1]] += 1
    return {str(g): n for g, n in sorted(sizes.items())}


def groups_phrase(sizes: dict[str, int]) -> str:
    """'group size 128', or 'group sizes 64 (180 projections) and 128 (30)' when they differ."""
    if len(sizes) <= 1:
        return f"group size {next(iter(sizes), 0)}"
    parts = [f"{g} ({n} projections)" if i == 0 else f"{g} ({n})"
             for i, (g, n) in enumerate(sizes.items())]
    return "group sizes " + ", ".join(parts[:-1]) + " and " + parts[-1]


def int4_linear(linear) -> Any:
    """An Int4Linear from a Linear (or a MatVecLinear) with in_features divisible by 64."""
    g = group_size_for(linear.in_features)
    if g is None:
        raise ValueError(f"int4-inductor: in_features {linear.in_features} is not divisible by 64")
    return _module()(linear.weight, linear.bias, g)


def concat_int4(layers) -> Any:
    """One Int4Linear over the rows of several reading one input (the decode step's [q; k; v]).

    Packing, scales and offsets are per row, so stacking them along the rows is exact."""
    import torch
    from torch import nn

    cls = _module()
    shapes = {(m.in_features, m.group_size) for m in layers}
    if len(shapes) != 1 or any(type(m) is not cls for m in layers):
        raise ValueError(
            f"concat_int4: takes Int4Linear layers of one input size and group size, got {shapes}"
        )
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.out_features = sum(m.out_features for m in layers)
    (out.in_features, out.group_size), = shapes
    for name in ("packed", "scale", "offset"):
        out.register_buffer(name, torch.cat([getattr(m, name) for m in layers]))
    biased = [m.bias is not None for m in layers]
    if any(biased):
        biases = [m.bias if m.bias is not None else m.scale.new_zeros(m.out_features)
                  for m in layers]
        out.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    else:
        out.bias = None
    return out


def quantize_int4(module, skip_ids=frozenset()) -> None:
    """Replace each Linear / MatVecLinear under `module` by an Int4Linear, in place.

    Except those whose id() is in `skip_ids` and those whose input size no group size fits."""
    from torch import nn

    from inferlab.backends.fuse import _block_modules, swap_children

    kinds = (nn.Linear, _block_modules()[0])

    def swap(m):
        fits = type(m) in kinds and group_size_for(m.in_features) is not None
        return int4_linear(m) if fits and id(m) not in skip_ids else None

    swap_children(module, swap)


def describe(model, torchao: bool = False) -> str:
    """What an int4 path made of a model: group sizes, projections quantized and kept."""
    from torch import nn

    from inferlab.backends.fuse import _block_modules

    head = model.get_output_embeddings()
    sizes = group_sizes(model)
    if torchao:
        kept = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head
                and not hasattr(m.weight, "block_size")]
        return (f"torchao int4 weight-only (tinygemm), asymmetric, {groups_phrase(sizes)}; "
                f"{sum(sizes.values())} projections quantized, {len(kept)} kept in bf16 "
                "(output head in bf16)")
    quantized = [m for m in model.modules() if type(m) is _module()]
    plain = (nn.Linear, _block_modules()[0])
    kept = [m for m in model.modules() if type(m) in plain and m is not head]
    return (f"int4 weight-only, asymmetric, {groups_phrase(sizes)}, two per byte; "
            f"{len(quantized)} projections quantized, {len(kept)} kept in 16 bits "
            "(output head in 16 bits)")
