"""Models the project builds itself: random weights and the local tokenizer, Phi or Llama.

`tiny-phi` runs Phi-2's code paths in seconds; `phi-2-random` has Phi-2's shapes for speed and
memory work; `tiny-llama` has SmolLM2's code paths. The same config gives the same files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from inferlab.config import ModelConfig, resolve
from inferlab.models.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


def phi_config(model: ModelConfig, eos_id: int, bos_id: int | None = None,
               pad_id: int | None = None):
    from transformers import PhiConfig

    a = model.architecture
    return PhiConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_attention_heads,  # full multi-head attention, as Phi-2
        partial_rotary_factor=a.partial_rotary_factor,
        max_position_embeddings=a.max_position_embeddings,
        layer_norm_eps=a.layer_norm_eps,
        rope_theta=a.rope_theta,
        hidden_act="gelu_new",
        bos_token_id=eos_id if bos_id is None else bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id if pad_id is None else pad_id,
        tie_word_embeddings=False,
        architectures=["PhiForCausalLM"],
    )


def llama_config(model: ModelConfig, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None):
    from transformers import LlamaConfig

    a = model.architecture
    return LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads or a.num_attention_heads,
        max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=a.layer_norm_eps,
        rope_theta=a.rope_theta,
        hidden_act="silu",
        bos_token_id=eos_id if bos_id is None else bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id if pad_id is None else pad_id,
        tie_word_embeddings=a.tie_word_embeddings,
        architectures=["LlamaForCausalLM"],
    )


CONFIGS = {"phi": phi_config, "llama": llama_config}


def _write_legacy_rope_keys(path: Path, model: ModelConfig) -> None:
    """Rope settings at the top level too, as 4.x reads them (transformers 5 nests them).

    4.x would silently use partial_rotary_factor 0.5: both keep the checkpoint portable."""
    cfg = json.loads(path.read_text())
    if model.architecture.family == "phi":
        cfg["partial_rotary_factor"] = model.architecture.partial_rotary_factor
    cfg["rope_theta"] = model.architecture.rope_theta
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_model(model: ModelConfig, out_dir: Path) -> None:
    """Train the tokenizer, initialise seeded random weights and save both to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, PhiForCausalLM

    t0 = time.perf_counter()
    t = model.tokenizer
    train_tokenizer(resolve(t.corpus), t.vocab_size, out_dir, t.style)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if len(tok) > model.architecture.vocab_size:
        raise ValueError(
            f"model.architecture.vocab_size: {model.architecture.vocab_size} is smaller than the "
            f"tokenizer's {len(tok)} tokens"
        )
    make_config = CONFIGS[model.architecture.family]
    config = make_config(model, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    dtype = getattr(torch, model.dtype)
    torch.manual_seed(model.seed)
    n_params_hint = 12 * model.architecture.num_hidden_layers * model.architecture.hidden_size**2
    log.info(
        "building %s: %s, hidden %d, %d layers, about %.2fB parameters, random weights (seed %d), %s",
        model.name, config.architectures[0], config.hidden_size, config.num_hidden_layers,
        n_params_hint / 1e9, model.seed, model.dtype,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: half phi-2-random's memory
    try:
        net = {"phi": PhiForCausalLM, "llama": LlamaForCausalLM}[model.architecture.family](config)
    finally:
        torch.set_default_dtype(previous)
    net.generation_config.pad_token_id = config.pad_token_id
    # Rows past the tokenizer's vocabulary are padding (Phi-2: 50295 tokens, 51200 rows), which
    # random weights would emit as often as real tokens: a large negative output bias keeps
    # generation inside the vocabulary, with shapes (so speed and memory) unchanged.
    if len(tok) < config.vocab_size:
        if getattr(net.lm_head, "bias", None) is None:
            raise ValueError(
                f"model.architecture.vocab_size: {config.vocab_size} rows for {len(tok)} tokens; "
                f"a {model.architecture.family} model has no output bias to mask the padding rows"
            )
        with torch.no_grad():
            net.lm_head.bias[len(tok):] = -1e4
    net.save_pretrained(str(out_dir), safe_serialization=True)
    _write_legacy_rope_keys(out_dir / "config.json", model)
    n = sum(p.numel() for p in net.parameters())
    log.info("built %s: %d parameters in %.1f s", model.name, n, time.perf_counter() - t0)
