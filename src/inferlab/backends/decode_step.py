"""A hand-written decode step (`decode: kernels`) that the graph loop replays instead of the model.

Phi's compiled fused block ran about nine kernels per layer; on an H200 its 298 kernels per token
spent 0.25 ms in elementwise kernels and 0.13 ms between kernels beside 1.46 ms of GEMVs
(docs/decode-loops.md). This step, per Phi layer:

    layer_norm(x)                                          -> h
    gemv(h -> [Wq; Wk; Wv; Wfc1] + b, GELU on fc1's rows)  -> qkv, and act into buf[H D:]
    attention(qkv, rotary, cache write at pos)             -> buf[:H D] (two launches)
    gemv(buf -> [Wdense | Wfc2] + b + x)                   -> x (in place)

and per Llama layer, [q; k; v] and [gate; up] fused from copies of the model's weights:

    rms_norm(x) -> h;  gemv(h -> [Wq; Wk; Wv]) -> qkv;  attention(qkv, ...) -> a
    gemv(a -> Wo + x) -> x (in place)
    rms_norm(x) -> h;  gemv(h -> [Wgate; Wup], SiLU(gate) * up) -> m;  gemv(m -> Wdown + x) -> x

then the final norm, the head's GEMV and an argmax. The prefill is the model's own forward on the
same StaticCache. Batch 1 only. On the CPU the torch references run (they read the position on
the host, which a CUDA graph cannot); on CUDA the Triton kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from inferlab.backends.base import BackendUnavailable
from inferlab.config import KERNEL_STEP_ARCHITECTURES

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SILU = ("silu", "swish")


@dataclass
class Layer:
    ln: tuple  # (weight, bias, eps) of the input layer norm; Llama: (weight, eps)
    w_in: Any  # Phi: [q; k; v; fc1], Llama: [q; k; v]: a weight tensor (N, K) or an Int4Linear
    b_in: Any
    w_out: Any  # Phi: [dense | fc2], Llama: o_proj
    b_out: Any
    ln2: tuple = ()  # Llama: (weight, eps) of the post-attention RMSNorm
    w_up: Any = None  # Llama: [gate; up]
    w_down: Any = None  # Llama: down_proj
    k_cache: Any = None  # (1, KV heads, max length, head dim): the static cache's own tensors
    v_cache: Any = None


def _weight(proj):
    """A projection's weight as the kernels take it: a MatVecLinear's tensor, or the Int4Linear."""
    return proj if hasattr(proj, "packed") else proj.weight


def _fused(*projs):
    """One weight (a tensor or an Int4Linear) over the rows of the projections of one input."""
    import torch

    from inferlab.backends.int4 import _module as int4_module
    from inferlab.backends.int4 import concat_int4

    if all(type(p) is int4_module() for p in projs):
        return projs[0] if len(projs) == 1 else concat_int4(projs)
    if all(type(p) is torch.nn.Linear for p in projs):
        weights = [p.weight.detach() for p in projs]
        return weights[0] if len(weights) == 1 else torch.cat(weights).contiguous()
    kinds = sorted({type(p).__name__ for p in projs})
    raise BackendUnavailable(
        f"decode: kernels fuses a Llama layer's projections from Linear or int4-inductor "
        f"layers, found {', '.join(kinds)} (leave fuse_qkv and gemv unset)"
    )


def architecture_problem(arch: str) -> str | None:
    """Why decode: kernels cannot run a model of class `arch`, or None."""
    if arch not in KERNEL_STEP_ARCHITECTURES:
        runs = " and ".join(KERNEL_STEP_ARCHITECTURES)
        return f"decode: kernels runs {runs}; this model is {arch}"
    return None


class DecodeStep:
    """step(tok (1, 1), pos (1, 1)) -> the greedy next token (1, 1); writes k, v into the cache.

    After a call `logits` holds its logits (vocab,) and `launches` the kernels it launched."""

    def __init__(self, model, triton: bool, int4_gemv: str = "rows", fuse_norm: bool = False,
                 fuse_attention: bool = False):
        problem = architecture_problem(type(model).__name__)
        if problem:
            raise BackendUnavailable(problem)
        self.llama = type(model).__name__ == "LlamaForCausalLM"
        if fuse_norm and not self.llama:
            raise BackendUnavailable(
                "fuse_norm puts Llama's RMSNorm in the GEMV prologue; Phi's layer norm has none"
            )
        self.fuse_norm = fuse_norm  # each RMSNorm in the prologue of the GEMV that reads it
        self.fuse_attention = fuse_attention  # attention in one launch (a program per query head)
        cfg = model.config
        self.layers: list[Layer] = []
        (self._llama_layers if self.llama else self._phi_layers)(model)
        a = model.model.layers[0].self_attn
        self.heads, self.head_dim = cfg.num_attention_heads, a.head_dim
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.rot = self.head_dim if self.llama else a.rotary_ndims
        self.scale = a.scaling
        self.width = self.heads * self.head_dim  # the attention's output row
        self.split = (self.heads + 2 * self.kv_heads) * self.head_dim  # [q; k; v]'s rows
        if self.llama:
            fl = model.model.norm
            self.final_ln = (fl.weight, fl.variance_epsilon)
        else:
            fl = model.model.final_layernorm
            self.final_ln = (fl.weight, fl.bias, fl.eps)
        head = model.get_output_embeddings()
        self.head, self.head_b = _weight(head), head.bias
        self.embed = model.model.embed_tokens.weight
        self.model, self.triton = model, triton
        self.int4_gemv = int4_gemv  # the Triton kernel of int4 GEMVs (config.STEP_INT4_GEMVS)
        if triton:
            from inferlab.backends import step_kernels

            step_kernels.prepare()
        self.cos = self.sin = None
        self.cache = None  # the StaticCache whose tensors the layers hold
        self.logits = None  # (vocab,): the last call's logits
        self.launches: int | None = None  # Triton only: the references are torch

    def _phi_layers(self, model) -> None:
        from inferlab.backends.fuse import _block_modules

        _, block_input, _, block_output = _block_modules()
        cfg = model.config
        act = getattr(cfg, "hidden_act", None)
        if act not in GELU_TANH:
            raise BackendUnavailable(
                f"decode: kernels writes GELU (tanh) in its epilogue; this model's hidden_act "
                f"is {act!r}"
            )
        if getattr(cfg, "qk_layernorm", False):
            raise BackendUnavailable("decode: kernels has no q/k layer norm (qk_layernorm: true)")
        if getattr(cfg, "num_key_value_heads", None) not in (None, cfg.num_attention_heads):
            raise BackendUnavailable(
                "decode: kernels takes one key/value head per attention head in Phi's layout"
            )
        for layer in model.model.layers:
            a = layer.self_attn
            if type(a.q_proj) is not block_input or type(layer.mlp.fc2) is not block_output:
                raise BackendUnavailable(
                    "decode: kernels runs Phi's fused parallel block: set fuse_block: true"
                )
            ln = layer.input_layernorm
            w_in, w_out = a.q_proj.proj, layer.mlp.fc2.proj
            self.layers.append(Layer((ln.weight, ln.bias, ln.eps), _weight(w_in), w_in.bias,
                                     _weight(w_out), w_out.bias))

    def _llama_layers(self, model) -> None:
        cfg = model.config
        act = getattr(cfg, "hidden_act", None)
        if act not in SILU:
            raise BackendUnavailable(
                f"decode: kernels writes SiLU(gate) * up in its epilogue; this model's "
                f"hidden_act is {act!r}"
            )
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise BackendUnavailable(
                "decode: kernels runs Llama projections without biases (attention_bias and "
                "mlp_bias false)"
            )
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        # the tables come from the model, but a scaling would stay its own
        if rope.get("rope_type", "default") != "default":
            raise BackendUnavailable(
                f"decode: kernels takes Llama's default rotary embedding, this model has "
                f"rope_type {rope.get('rope_type')!r}"
            )
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            self.layers.append(Layer(
                (n1.weight, n1.variance_epsilon), _fused(a.q_proj, a.k_proj, a.v_proj), None,
                _fused(a.o_proj), None, ln2=(n2.weight, n2.variance_epsilon),
                w_up=_fused(m.gate_proj, m.up_proj), w_down=_fused(m.down_proj),
            ))

    def bind(self, cache, max_len: int) -> None:
        """Take the filled static cache's tensors, make rotary tables, allocate buffers."""
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
        first = self.layers[0]
        down = first.w_down if self.llama else first.w_out
        inter = down.in_features if hasattr(down, "packed") else down.shape[1]
        self.x = torch.empty(k, dtype=dtype, device=dev)
        self.h = torch.empty(k, dtype=dtype, device=dev)  # the normed row
        self.qkv = torch.empty(self.split, dtype=dtype, device=dev)
        # Phi: [attention output | GELU(fc1)]; Llama: SiLU(gate) * up (attention in self.attn)
        self.buf = torch.empty(inter, dtype=dtype, device=dev)
        if self.llama:
            self.attn = torch.empty(self.width, dtype=dtype, device=dev)
        else:
            self.attn = self.buf[: self.width]
        self.logits = torch.empty(self.embed.shape[0], dtype=dtype, device=dev)
        self.cache = cache

    def __call__(self, tok, pos):
        import torch

        from inferlab.backends import step_kernels as sk

        before = sk.LAUNCHES[0]
        torch.index_select(self.embed, 0, tok.view(-1), out=self.x.view(1, -1))
        (self._llama if self.llama else self._phi)(pos)
        nxt = self.logits.argmax(-1).view(1, 1)
        # + the embedding and the argmax
        self.launches = sk.LAUNCHES[0] - before + 2 if self.triton else None
        return nxt

    def _kernels(self):
        from inferlab.backends import step_kernels as sk

        if self.triton:
            return (sk.layer_norm, sk.rms_norm, functools.partial(sk.gemv, int4=self.int4_gemv),
                    functools.partial(sk.attention, one=self.fuse_attention))
        return sk.ref_layer_norm, sk.ref_rms_norm, sk.ref_gemv, sk.ref_attention

    def _phi(self, pos) -> None:
        norm, _, gemv, attention = self._kernels()
        x, h, buf, w = self.x, self.h, self.buf, self.width
        for layer in self.layers:
            norm(x, *layer.ln, out=h)
            gemv(h, layer.w_in, layer.b_in, act_from=self.split, out=self.qkv, split=self.split,
                 out2=buf[w:])
            attention(self.qkv, layer.k_cache, layer.v_cache, self.cos, self.sin, pos, out=buf[:w],
                      scale=self.scale)
            gemv(buf, layer.w_out, layer.b_out, res=x, out=x)
        norm(x, *self.final_ln, out=h)
        gemv(h, self.head, self.head_b, out=self.logits)

    def _llama(self, pos) -> None:
        _, rms, gemv, attention = self._kernels()
        x, h, buf = self.x, self.h, self.buf

        def normed(norm) -> dict:
            """The next GEMV's input: x with the norm in its prologue (fuse_norm), or h normed now."""
            if self.fuse_norm:
                return {"x": x, "norm": norm}
            rms(x, *norm, out=h)
            return {"x": h}

        for layer in self.layers:
            gemv(w=layer.w_in, b=None, out=self.qkv, **normed(layer.ln))
            attention(self.qkv, layer.k_cache, layer.v_cache, self.cos, self.sin, pos,
                      out=self.attn, scale=self.scale)
            gemv(self.attn, layer.w_out, None, res=x, out=x)
            gemv(w=layer.w_up, b=None, out=buf, glu_rows=True, **normed(layer.ln2))
            gemv(buf, layer.w_down, None, res=x, out=x)
        gemv(w=self.head, b=self.head_b, out=self.logits, **normed(self.final_ln))
