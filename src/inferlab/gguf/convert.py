"""Hugging Face checkpoint → GGUF (F32 / F16), written with PyPI's `gguf` package.

PyPI's `gguf` is not the copy bundled in llama.cpp's tree, and llama.cpp's `convert_hf_to_gguf.py` rejects a
locally trained BPE tokenizer; so this converter writes the file itself: metadata from config.json, the
tokenizer from tokenizer.json (GPT-2-style byte-level BPE), and tensors renamed with gguf's TensorNameMap.
It reads the safetensors one tensor at a time, so a 2.7B model converts in a few GB of memory.
1-D tensors (norms, biases) stay F32 in every output type, as llama.cpp expects.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Hugging Face architectures this converter writes, with the llama.cpp architecture they map to.
SUPPORTED = {"PhiForCausalLM": "phi2"}


class ConversionError(RuntimeError):
    pass


def _hf_config(hf_dir: Path) -> dict:
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConversionError(
            f"{hf_dir}: architecture {arch} is not supported by inferlab's converter "
            f"(supported: {', '.join(SUPPORTED)}); convert it with llama.cpp's convert_hf_to_gguf.py and put the "
            "file under models/<name>/gguf/"
        )
    return cfg


def _rope_param(cfg: dict, key: str, default: float) -> float:
    # transformers 5 groups rope settings under rope_parameters; 4.x keeps them at the top level
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    return (cfg.get("rope_parameters") or {}).get(key, default)


def _tokenizer_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[str], dict]:
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"{hf_dir}/tokenizer.json: model type {model.get('type')}; only BPE is supported")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ConversionError(f"tokenizer has token id {max(by_id)} but the model has only {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        s = by_id.get(i)
        if s is None:  # embedding rows past the tokenizer: padding, as llama.cpp's converter writes them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            tokens.append(s)
            types.append(gguf.TokenType.CONTROL if added[s].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {}
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    for role in ("bos", "eos", "unk", "pad"):
        tok = tcfg.get(f"{role}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok in vocab:
            special[role] = vocab[tok]
    return tokens, [int(t) for t in types], merges, special


def convert(hf_dir: Path, out_path: Path, outtype: str = "f16") -> dict:
    """Write one GGUF file (outtype f32 or f16); returns a summary (tensor count, parameters, seconds)."""
    import gguf
    from safetensors import safe_open

    if outtype not in ("f32", "f16"):
        raise ConversionError(f"outtype {outtype!r}; allowed: f32, f16")
    t0 = time.perf_counter()
    cfg = _hf_config(hf_dir)
    arch_name = SUPPORTED[cfg["architectures"][0]]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = cfg["num_hidden_layers"]
    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    head_dim = n_embd // n_head
    rotary = _rope_param(cfg, "partial_rotary_factor", 0.5)

    tmp = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(hf_dir.parent.name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(n_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_eps(cfg.get("layer_norm_eps", 1e-5))
    writer.add_rope_dimension_count(int(rotary * head_dim))
    writer.add_rope_freq_base(float(_rope_param(cfg, "rope_theta", 10000.0)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, types, merges, special = _tokenizer_vocab(hf_dir, cfg["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's regex split, as the ByteLevel pre-tokenizer with use_regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, tid in special.items():
        getattr(writer, f"add_{role}_token_id")(tid)
    writer.add_add_bos_token(False)  # Phi's tokenizer adds no BOS; the same text gives the same ids here

    tmap = gguf.get_tensor_name_map(arch, n_layers)
    n_params = 0
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no .safetensors files")
    names = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ConversionError(f"{f.name}: tensor {key} has no GGUF name for {arch_name}")
                data = st.get_tensor(key).float().numpy()
                wide = outtype == "f32" or data.ndim == 1  # norms and biases stay F32
                data = data.astype(np.float32 if wide else np.float16)
                n_params += data.size
                writer.add_tensor(new, data)
                names.append(new)
    log.info("writing %s (%s, %d tensors, %.1fM parameters)", out_path.name, outtype, len(names), n_params / 1e6)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=n_params > 100_000_000)
        writer.close()
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": len(names), "parameters": n_params, "seconds": round(time.perf_counter() - t0, 3)}


def quantize(src: Path, dst: Path, ftype: int, threads: int = 0) -> float:
    """llama.cpp's quantizer (through llama-cpp-python), into a temporary file renamed into place."""
    import llama_cpp

    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(f"llama_model_quantize returned {rc} for {dst.name}")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - t0


def tensor_stats(path: Path) -> dict:
    """Weights' bytes, parameter count and bits per weight, read from the GGUF file's tensor table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elems = sum(int(t.n_elements) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "file_bytes": path.stat().st_size,
        "weight_bytes": n_bytes,
        "parameters": n_elems,
        "bits_per_weight": round(8 * n_bytes / n_elems, 4),
        "tensor_types": types,
    }
