"""A hand-written decode step for Phi's parallel block (`decode: kernels` of a transformers point): the graph loop
(backends/hf_decode.py) replays it instead of the model's compiled forward.

The compiled step of the fused block (fuse_block + gemv: triton) runs about nine kernels per layer: layer norm,
the [q; k; v; fc1] GEMV, rotary and the KV-cache write, attention (cuDNN), GELU, the concatenation of the
attention output with fc2's input, the [dense | fc2] GEMV and the residual adds. On an H200 its 298 kernels per
token spent 0.25 ms in elementwise kernels and 0.13 ms between kernels beside 1.46 ms of GEMVs
(docs/decode-loops.md). This step is four kernels per layer (backends/step_kernels.py):

    layer_norm(x)                                                       -> h
    gemv(h -> [Wq; Wk; Wv; Wfc1] + b, GELU on fc1's rows)               -> qkv, and act into buf[H D:]
    attention(qkv, rotary, cache write at pos, softmax over the cache)  -> buf[:H D] (two launches)
    gemv(buf -> [Wdense | Wfc2] + b + x)                                 -> x (in place)

then the final layer norm, the output head's GEMV and an argmax: 5 launches per layer and 4 per token. The prefill
stays the model's own forward on the same static cache (transformers' StaticCache), which the step then reads and
extends. Batch 1 only (each kernel takes one row). On the CPU each kernel runs as its torch reference (the same
function; the path the tests take); on CUDA the Triton kernels (the references read the position on the host, which
a CUDA graph cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferlab.backends.base import BackendUnavailable

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class Layer:
    ln: tuple  # (weight, bias, eps) of the input layer norm
    w_in: Any  # [q; k; v; fc1]: a weight tensor (N, K) or an Int4Linear
    b_in: Any
    w_out: Any  # [dense | fc2]
    b_out: Any
    k_cache: Any = None  # (1, heads, max length, head dim), the static cache's own tensors
    v_cache: Any = None


def _weight(proj):
    """A fused projection's weight as the kernels take it: the tensor of a MatVecLinear, an Int4Linear as it is."""
    return proj if hasattr(proj, "packed") else proj.weight


class DecodeStep:
    """step(tok (1, 1), pos (1, 1)) -> the greedy next token (1, 1), writing the new k/v into the static cache."""

    def __init__(self, model, triton: bool):
        from inferlab.backends.fuse import _block_modules

        _, block_input, _, block_output = _block_modules()
        cfg = model.config
        act = getattr(cfg, "hidden_act", None)
        if act not in GELU_TANH:
            raise BackendUnavailable(f"decode: kernels writes GELU (tanh) in its epilogue; this model's hidden_act "
                                     f"is {act!r}")
        if getattr(cfg, "qk_layernorm", False):
            raise BackendUnavailable("decode: kernels has no q/k layer norm (qk_layernorm: true)")
        self.layers: list[Layer] = []
        for layer in model.model.layers:
            a = layer.self_attn
            if type(a.q_proj) is not block_input or type(layer.mlp.fc2) is not block_output:
                raise BackendUnavailable("decode: kernels runs Phi's fused parallel block: set fuse_block: true")
            ln = layer.input_layernorm
            w_in, w_out = a.q_proj.proj, layer.mlp.fc2.proj
            self.layers.append(Layer((ln.weight, ln.bias, ln.eps), _weight(w_in), w_in.bias, _weight(w_out),
                                     w_out.bias))
        a = model.model.layers[0].self_attn
        self.heads, self.head_dim = cfg.num_attention_heads, a.head_dim
        self.rot = a.rotary_ndims
        self.scale = a.scaling
        self.width = self.heads * self.head_dim  # the attention's output row
        self.split = 3 * self.width  # rows of [q; k; v] in the input projection
        if getattr(cfg, "num_key_value_heads", self.heads) != self.heads:
            raise BackendUnavailable("decode: kernels takes one key/value head per attention head (Phi's layout)")
        fl = model.model.final_layernorm
        self.final_ln = (fl.weight, fl.bias, fl.eps)
        head = model.get_output_embeddings()
        self.head, self.head_b = _weight(head), head.bias
        self.embed = model.model.embed_tokens.weight
        self.model, self.triton = model, triton
        if triton:
            from inferlab.backends import step_kernels

            step_kernels.prepare()
        self.cos = self.sin = None
        self.cache = None  # the StaticCache whose tensors the layers hold

    def bind(self, cache, max_len: int) -> None:
        """Take the static cache's tensors (after a prefill made them) and the rotary tables for max_len
        positions; allocate the step's buffers."""
        import torch

        if self.cache is cache and self.cos is not None and self.cos.shape[0] >= max_len:
            return
        for layer, cached in zip(self.layers, cache.layers, strict=True):
            if cached.keys is None or cached.keys.shape[0] != 1:
                raise BackendUnavailable("decode: kernels runs batch 1 over a filled static cache")
            layer.k_cache, layer.v_cache = cached.keys, cached.values
        dev, dtype = self.embed.device, self.embed.dtype
        positions = torch.arange(max_len, device=dev).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(self.embed[:1].unsqueeze(0), positions)
        self.cos, self.sin = cos[0, :, : self.rot].contiguous(), sin[0, :, : self.rot].contiguous()
        k = self.embed.shape[1]
        inter = self.layers[0].w_out.in_features if hasattr(self.layers[0].w_out, "packed") \
            else self.layers[0].w_out.shape[1]
        self.x = torch.empty(k, dtype=dtype, device=dev)
        self.h = torch.empty(k, dtype=dtype, device=dev)  # the normed row
        self.qkv = torch.empty(self.split, dtype=dtype, device=dev)
        self.buf = torch.empty(inter, dtype=dtype, device=dev)  # [attention output | GELU(fc1)]
        self.logits = torch.empty(self.embed.shape[0], dtype=dtype, device=dev)
        self.cache = cache

    def __call__(self, tok, pos):
        import torch

        from inferlab.backends import step_kernels as sk

        norm, gemv, attention = ((sk.layer_norm, sk.gemv, sk.attention) if self.triton
                                 else (sk.ref_layer_norm, sk.ref_gemv, sk.ref_attention))
        x, h, buf, w = self.x, self.h, self.buf, self.width
        torch.index_select(self.embed, 0, tok.view(-1), out=x.view(1, -1))
        for layer in self.layers:
            norm(x, *layer.ln, out=h)
            gemv(h, layer.w_in, layer.b_in, act_from=self.split, out=self.qkv, split=self.split, out2=buf[w:])
            attention(self.qkv, layer.k_cache, layer.v_cache, self.cos, self.sin, pos, out=buf[:w], scale=self.scale)
            gemv(buf, layer.w_out, layer.b_out, res=x, out=x)
        norm(x, *self.final_ln, out=h)
        gemv(h, self.head, self.head_b, out=self.logits)
        return self.logits.argmax(-1).view(1, 1)
