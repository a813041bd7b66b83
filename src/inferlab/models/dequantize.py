"""A Llama GGUF file (any quantization) → a plain Hugging Face checkpoint.

transformers' own GGUF loader took 42 s for SmolLM2-135M on 2 cores and its result cannot be
saved. This reads the file once with gguf-py, dequantizes, undoes the converter's q/k row
permutation and rebuilds the tokenizer: 10 s. The tests check it against transformers' loader
on a tiny model: the same weights, bit for bit, and the same token ids.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizers that split single digits before GPT-2's regex (llama-vocab.cpp),
# and those that split with GPT-2's regex alone
DIGIT_SPLIT = ("smollm", "starcoder", "refact", "codeshell", "command-r")
GPT2_SPLIT = ("gpt-2", "default")


class GGUFCheckpointError(RuntimeError):
    pass


def _field(reader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def describe(reader) -> dict:
    """What a GGUF file holds: its llama.cpp file type and its tensor types counted."""
    import gguf

    ftype = _field(reader, "general.file_type")
    if ftype is None:
        name = "?"
    else:
        name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"file_type": name, "tensor_types": dict(types.most_common())}


def llama_config(reader):
    """transformers' LlamaConfig from the file's metadata."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFCheckpointError(
            f"architecture {arch!r}: only llama GGUF files are dequantized here"
        )

    def hp(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise GGUFCheckpointError(f"the file has no llama.{key}")
        return value

    n_embd, n_head = hp("embedding_length"), hp("attention.head_count")
    head_dim = hp("attention.key_length", n_embd // n_head)
    if hp("rope.dimension_count", head_dim) != head_dim:
        raise GGUFCheckpointError("partial rotary embeddings are not a llama model's")
    names = {t.name for t in reader.tensors}
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=hp("vocab_size", len(tokens.data) if tokens is not None else None),
        hidden_size=n_embd,
        intermediate_size=hp("feed_forward_length"),
        num_hidden_layers=hp("block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=hp("attention.head_count_kv", n_head),
        head_dim=head_dim,
        max_position_embeddings=hp("context_length"),
        rms_norm_eps=hp("attention.layer_norm_rms_epsilon"),
        rope_theta=hp("rope.freq_base", 10000.0),
        hidden_act="silu",
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in names,
        architectures=["LlamaForCausalLM"],
    )


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of the converter's query/key row permutation (gguf/convert.py permute_rows)."""
    pairs = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def state_dict(reader, config) -> dict:
    """Every tensor dequantized to float32 under its transformers name."""
    import gguf
    import torch
    from gguf.quants import dequantize as gguf_dequantize
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        keys = list(LlamaForCausalLM(config).state_dict())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf_name = {tmap.get_name(k, try_suffixes=(".weight", ".bias")): k for k in keys}
    out = {}
    for t in reader.tensors:
        key = hf_name.get(t.name)
        if key is None:
            raise GGUFCheckpointError(f"tensor {t.name} has no place in LlamaForCausalLM")
        # a copy: F32 data is memory-mapped
        w = np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
        if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias"):
            w = unpermute_rows(w, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight") or key.endswith("self_attn.k_proj.bias"):
            w = unpermute_rows(w, config.num_key_value_heads)
        out[key] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def _strings(reader, key: str) -> list[str]:
    f = reader.get_field(key)
    return [] if f is None else [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def tokenizer(reader, max_length: int):
    """transformers' fast tokenizer from the file's byte-level BPE, specials and chat template.

    It splits text as llama.cpp does with the same file."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFCheckpointError(
            f"tokenizer {_field(reader, 'tokenizer.ggml.model')!r}: only byte-level BPE "
            "(gpt2) vocabularies are rebuilt here"
        )
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [])] or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges")]
    vocab = {s: i for i, s in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in DIGIT_SPLIT:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in GPT2_SPLIT:
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFCheckpointError(f"pre-tokenizer {pre!r}: only gpt-2 and the digit-splitting ones "
                                  f"({', '.join(DIGIT_SPLIT)}) are rebuilt here")
    tok.decoder = decoders.ByteLevel()
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    tok.add_tokens([AddedToken(s, special=ty == control, normalized=False)
                    for s, ty in zip(tokens, types) if ty in (control, user)])
    roles = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        tid = _field(reader, f"tokenizer.ggml.{key}")
        if tid is not None:
            roles[f"{role}_token"] = tokens[tid]
    adds_bos = _field(reader, "tokenizer.ggml.add_bos_token", False)
    if adds_bos or _field(reader, "tokenizer.ggml.add_eos_token", False):
        raise GGUFCheckpointError("a tokenizer that adds BOS or EOS by itself is not rebuilt here")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left",
                                   model_max_length=max_length, **roles)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def to_checkpoint(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict:
    """Write the GGUF's model as config, safetensors and tokenizer; returns describe()'s summary."""
    import gguf
    import torch
    from transformers import LlamaForCausalLM

    from inferlab.models.tokenizer import make_portable

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(gguf_path))
    info = describe(reader)
    config = llama_config(reader)
    weights = state_dict(reader, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise GGUFCheckpointError(
            f"{gguf_path.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.generation_config.pad_token_id = config.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer(reader, config.max_position_embeddings).save_pretrained(str(out_dir))
    make_portable(out_dir)
    n = sum(w.numel() for w in weights.values())
    types = ", ".join(f"{c} {t}" for t, c in info["tensor_types"].items())
    log.info("dequantized %s (%s: %s) to a LlamaForCausalLM checkpoint, %.1fM parameters in %s, "
             "in %.1f s", gguf_path.name, info["file_type"], types, n / 1e6, dtype,
             time.perf_counter() - t0)
    return info
