"""Hugging Face checkpoint → GGUF (F32 / F16), written with PyPI's `gguf` package.

llama.cpp's `convert_hf_to_gguf.py` rejects a locally trained BPE tokenizer, so this writes
the file itself: metadata from config.json, byte-level BPE from tokenizer.json, tensors renamed
with gguf's TensorNameMap. Phi (phi2) and Llama (llama: q/k rows permuted as LlamaModel.permute
does, a tied head left out). One tensor at a time, so 2.7B converts in a few GB of memory;
1-D tensors stay F32, as llama.cpp expects.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import mmap
import re
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Hugging Face architectures this converter writes, with the llama.cpp architecture they map to.
SUPPORTED = {"PhiForCausalLM": "phi2", "LlamaForCausalLM": "llama"}


class ConversionError(RuntimeError):
    pass


def _hf_config(hf_dir: Path) -> dict:
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConversionError(
            f"{hf_dir}: architecture {arch} is not supported by inferlab's converter "
            f"(supported: {', '.join(SUPPORTED)}); convert it with llama.cpp's "
            "convert_hf_to_gguf.py and put the file under models/<name>/gguf/"
        )
    return cfg


def _rope_param(cfg: dict, key: str, default: float) -> float:
    # transformers 5 groups rope settings under rope_parameters; 4.x keeps them at the top level
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    return (cfg.get("rope_parameters") or {}).get(key, default)


def _pre_tokenizer(hf_dir: Path, tj: dict) -> str:
    """llama.cpp's name for the tokenizer's split of text into words, from tokenizer.json.

    GPT-2's regex alone is "gpt-2"; single digits split before it is "smollm". Anything else
    llama.cpp would tokenize differently: refused, naming what was found."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict) -> bool:
        return (
            step.get("type") == "ByteLevel" and step.get("use_regex", True)
            and not step.get("add_prefix_space")
        )

    if tj.get("normalizer") is None:
        if len(steps) == 1 and byte_level(steps[0]):
            return "gpt-2"
        digits = steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
        if len(steps) == 2 and digits and byte_level(steps[1]):
            return "smollm"
    found = json.dumps({"normalizer": tj.get("normalizer"), "pre_tokenizer": pre})[:300]
    raise ConversionError(
        f"{hf_dir}/tokenizer.json: a pre-tokenizer this converter cannot name for llama.cpp "
        f"({found}); supported: ByteLevel with GPT-2's regex (gpt-2), or "
        "Digits(individual_digits) then ByteLevel (smollm), no normalizer"
    )


def _adds_specials(hf_dir: Path, special: dict[str, int]) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before (EOS after) the text: add_bos / add_eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    added = len(full) > len(plain)
    add_bos = added and "bos" in special and full[0] == special["bos"]
    add_eos = added and "eos" in special and full[-1] == special["eos"]
    return add_bos, add_eos


def _chat_template(hf_dir: Path, tcfg: dict) -> str | None:
    """transformers 5 saves chat_template.jinja; earlier ones tokenizer_config.json."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = tcfg.get("chat_template")
    return template if isinstance(template, str) else None


def _write_tokenizer(writer, hf_dir: Path, n_vocab: int) -> dict:
    """Vocabulary, merges, pre-tokenizer, specials and chat template; returns what it wrote."""
    import gguf

    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ConversionError(
            f"{hf_dir}/tokenizer.json: model type {model.get('type')}; only BPE is supported"
        )
    pre = _pre_tokenizer(hf_dir, tj)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ConversionError(
            f"tokenizer has token id {max(by_id)} but the model has only {n_vocab} embedding rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        s = by_id.get(i)
        if s is None:  # rows past the tokenizer: padding, as llama.cpp's converter writes them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            tokens.append(s)
            special_token = added[s].get("special")
            types.append(gguf.TokenType.CONTROL if special_token else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        tok = tcfg.get(f"{role}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok in vocab:
            special[role] = vocab[tok]
    add_bos, add_eos = _adds_specials(hf_dir, special)
    template = _chat_template(hf_dir, tcfg)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for role, tid in special.items():
        getattr(writer, f"add_{role}_token_id")(tid)
    writer.add_add_bos_token(add_bos)  # as the HF tokenizer does: the same text, the same ids
    writer.add_add_eos_token(add_eos)
    if template:
        writer.add_chat_template(template)
    return {
        "pre": pre, "tokens": len(tokens), "merges": len(merges), "special": special,
        "add_bos": add_bos, "add_eos": add_eos, "chat_template": template is not None,
    }


def _write_hparams(writer, cfg: dict, arch_name: str, file_type) -> None:
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or n_embd // n_head
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(_rope_param(cfg, "rope_theta", 10000.0)))
    writer.add_file_type(file_type)
    if arch_name == "phi2":
        writer.add_layer_norm_eps(cfg.get("layer_norm_eps", 1e-5))
        rotary = _rope_param(cfg, "partial_rotary_factor", 0.5)
        writer.add_rope_dimension_count(int(rotary * head_dim))
        return
    rope_type = _rope_param(cfg, "rope_type", "default")
    if cfg.get("rope_scaling") or rope_type != "default":
        raise ConversionError(
            f"rope scaling ({cfg.get('rope_scaling') or rope_type}) is not supported by "
            "inferlab's converter; convert this model with llama.cpp's convert_hf_to_gguf.py"
        )
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """q or k rows (or bias) from transformers' rotary layout to llama.cpp's (LlamaModel.permute).

    llama.cpp rotates interleaved pairs of a head's dimensions, transformers its two halves."""
    halves = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def _llama_tensor(key: str, data: np.ndarray, cfg: dict) -> np.ndarray:
    if ".self_attn.q_proj." in key:
        return permute_rows(data, cfg["num_attention_heads"])
    if ".self_attn.k_proj." in key:
        return permute_rows(data, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return data


def convert(hf_dir: Path, out_path: Path, outtype: str = "f16") -> dict:
    """Write one GGUF file (outtype f32 or f16); returns tensor count, parameters, seconds."""
    import gguf
    from safetensors import safe_open

    if outtype not in ("f32", "f16"):
        raise ConversionError(f"outtype {outtype!r}; allowed: f32, f16")
    t0 = time.perf_counter()
    cfg = _hf_config(hf_dir)
    arch_name = SUPPORTED[cfg["architectures"][0]]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = cfg["num_hidden_layers"]
    tied = arch_name == "llama" and cfg.get("tie_word_embeddings", False)

    tmp = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    writer.add_name(hf_dir.parent.name)
    file_type = gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    _write_hparams(writer, cfg, arch_name, file_type)
    tokenizer = _write_tokenizer(writer, hf_dir, cfg["vocab_size"])

    tmap = gguf.get_tensor_name_map(arch, n_layers)
    n_params = 0
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no .safetensors files")
    names = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp; a tied head is the embedding matrix
                new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ConversionError(
                        f"{f.name}: tensor {key} has no GGUF name for {arch_name}"
                    )
                data = st.get_tensor(key).float().numpy()
                if arch_name == "llama":
                    data = _llama_tensor(key, data, cfg)
                wide = outtype == "f32" or data.ndim == 1  # norms and biases stay F32
                data = np.ascontiguousarray(data, dtype=np.float32 if wide else np.float16)
                n_params += data.size
                writer.add_tensor(new, data)
                names.append(new)
    if arch_name == "llama" and not tied and "output.weight" not in names:
        raise ConversionError(f"{hf_dir}: no lm_head.weight, and tie_word_embeddings is not set")
    chat = ", chat template" if tokenizer["chat_template"] else ""
    log.info("writing %s (%s %s, %d tensors, %.1fM parameters, pre-tokenizer %s%s)", out_path.name,
             arch_name, outtype, len(names), n_params / 1e6, tokenizer["pre"], chat)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=n_params > 100_000_000)
        writer.close()
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = round(time.perf_counter() - t0, 3)
    return {
        "tensors": len(names), "parameters": n_params, "seconds": seconds, "tokenizer": tokenizer,
    }


# llama.cpp's report of a tensor its file type's blocks do not fit (llama-quant.cpp), and the count
FALLBACK_TENSOR = re.compile(
    r"(\S+)\s+- ncols\s+\d+ not divisible by \d+ \(required for type\s+(\w+)\) "
    r"-> falling back to\s+(\w+)"
)
FALLBACK_COUNT = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
QUANT_DONE = re.compile(r"quant size\s+=")


def fallbacks_from_log(text: str) -> dict | None:
    """Tensors the quantizer stored in another type: its blocks do not divide their rows.

    None when the log shows no finished quantization (not captured, new wording): no claim."""
    if not QUANT_DONE.search(text):
        return None
    tensors = {name: {"required": req.upper(), "stored": got.upper()}
               for name, req, got in FALLBACK_TENSOR.findall(text)}
    m = FALLBACK_COUNT.search(text)
    if m and int(m.group(1)) != len(tensors):
        return None  # a count without the names (another wording): nothing certain to say
    return tensors


def quantize(src: Path, dst: Path, ftype: int, threads: int = 0) -> dict:
    """llama.cpp's quantizer, into a temporary file renamed into place; time and fallbacks."""
    import llama_cpp

    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.partial")
    log_text = io.StringIO()  # llama-cpp-python's log callback writes to sys.stderr
    try:
        with contextlib.redirect_stderr(log_text):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(
                f"llama_model_quantize returned {rc} for {dst.name}; its log ends:\n"
                f"{log_text.getvalue()[-800:]}"
            )
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "fallbacks": fallbacks_from_log(log_text.getvalue())}


def read_tensor_table(path: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape with row length first, type name, bytes) of every tensor, from the header.

    gguf's GGUFReader parses all metadata into numpy views (5 s for a 49,152-token vocabulary);
    this reads the header once with struct and skips the metadata."""
    import gguf

    scalar = {
        0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
    }
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ConversionError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ConversionError(f"{path}: GGUF version {version} (2 or later is read)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
            return m[pos - n: pos].decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                string()
            elif vtype == 9:
                item, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if item in (8, 9):
                    for _ in range(count):
                        skip(item)
                else:
                    pos += count * struct.calcsize("<" + scalar[item])
            else:
                pos += struct.calcsize("<" + scalar[vtype])

        for _ in range(n_kv):
            string()
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos += 4
            skip(vtype)
        table = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", m, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            ttype, _offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            qtype = gguf.GGMLQuantizationType(ttype)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            table.append((name, tuple(shape), qtype.name, math.prod(shape) // block * size))
    return table


def tensor_stats(path: Path) -> dict:
    """Bytes, parameters, bits per weight, tensor types and matrices (2-D: what is quantized)."""
    table = read_tensor_table(path)
    n_bytes = sum(t[3] for t in table)
    n_elems = sum(math.prod(t[1]) for t in table)
    return {
        "file_bytes": path.stat().st_size,
        "weight_bytes": n_bytes,
        "parameters": n_elems,
        "bits_per_weight": round(8 * n_bytes / n_elems, 4),
        "tensor_types": dict(Counter(t[2] for t in table).most_common()),
        "matrices": sum(len(t[1]) >= 2 for t in table),
    }


def holds(ftype: str, stats: dict, fallbacks: dict | None) -> dict:
    """What a file really holds: tensor types, fallbacks over layers, bits per weight, a label.

    E.g. 'q4_k_m (180 of 211 matrices fell back: 166 to q5_0, 14 to q8_0; 6.17 bpw)'."""
    bpw = f"{stats['bits_per_weight']:.2f} bpw"
    out = {"tensor_types": stats["tensor_types"], "matrices": stats["matrices"]}
    if ftype in ("f32", "f16"):
        return {**out, "fallback_tensors": 0, "label": f"{ftype} ({bpw})"}
    if fallbacks is None:
        label = f"{ftype} (fallbacks not reported by llama.cpp; {bpw})"
        return {**out, "fallback_tensors": None, "label": label}
    to = Counter(f["stored"] for f in fallbacks.values())
    groups = Counter((re.sub(r"^blk\.\d+\.", "blk.*.", name), f["required"], f["stored"])
                     for name, f in fallbacks.items())
    out.update(fallback_tensors=len(fallbacks), fallback_to=dict(to.most_common()),
               fallbacks=[{"tensors": name, "count": n, "required": req, "stored": got}
                          for (name, req, got), n in sorted(groups.items())])
    if fallbacks:
        to_text = ", ".join(f"{n} to {t.lower()}" for t, n in to.most_common())
        fell = f"{len(fallbacks)} of {stats['matrices']} matrices fell back"
        out["label"] = f"{ftype} ({fell}: {to_text}; {bpw})"
    else:
        out["label"] = f"{ftype} (no fallback; {bpw})"
    return out
