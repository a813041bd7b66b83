"""The Llama architecture: tiny-llama built here (SmolLM2's code paths), converted to GGUF and checked against
transformers through real llama.cpp; what quantized files really hold when rows do not fit k-quant blocks
(SmolLM2's 576); the int4 paths' group sizes on such rows."""

from __future__ import annotations

import json

import pytest

from inferlab.config import GGUF_FILE_TYPES, compose
from inferlab.gguf.convert import convert, holds, quantize, read_tensor_table, tensor_stats
from inferlab.gguf.pipeline import check_generates, logits_error
from inferlab.models.acquire import acquire

# SmolLM2-135M's shapes in one layer: rows of 576 (attention, gate, up) and 1536 (down)
SMOL_LAYER = ["model=tiny-llama", "model.architecture.hidden_size=576", "model.architecture.num_attention_heads=9",
              "model.architecture.num_key_value_heads=3", "model.architecture.intermediate_size=1536",
              "model.architecture.num_hidden_layers=1"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """tiny-llama built and converted to F32 and F16 GGUF (in this process: seconds)."""
    root = tmp_path_factory.mktemp("llama")
    acquire(compose(["model=tiny-llama"]).model, root / "hf")
    for t in ("f32", "f16"):
        convert(root / "hf", root / f"{t}.gguf", t)
    return root


@pytest.fixture(scope="module")
def smol_layer(tmp_path_factory):
    """One layer of SmolLM2's shapes, converted to F16 and quantized to q4_k_m and q4_0 by llama.cpp."""
    root = tmp_path_factory.mktemp("smol-layer")
    acquire(compose(SMOL_LAYER).model, root / "hf")
    convert(root / "hf", root / "f16.gguf", "f16")
    done = {q: quantize(root / "f16.gguf", root / f"{q}.gguf", GGUF_FILE_TYPES[q]) for q in ("q4_k_m", "q4_0")}
    return root, done


def test_tiny_llama_is_smollm2_in_miniature(llama):
    conf = json.loads((llama / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"]
    assert (conf["num_attention_heads"], conf["num_key_value_heads"], conf["tie_word_embeddings"]) == (4, 2, True)
    assert conf["hidden_size"] % 256 == 0 and conf["intermediate_size"] % 256 == 0  # k-quants need no fallback
    tj = json.loads((llama / "hf" / "tokenizer.json").read_text())
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert (llama / "hf" / "chat_template.jinja").exists()


def test_llama_f32_reproduces_transformers_logits(llama):
    """Query/key rows permuted as llama.cpp expects, grouped-query attention, tied head, RMS norm, rope theta: the
    F32 file's logits match transformers' (with an F32 KV cache, to 1e-5), and llama.cpp tokenizes code, digits,
    other scripts and a chat turn with its special tokens as transformers does."""
    check = logits_error(llama / "f32.gguf", llama / "hf")
    assert check["same_tokenization"], check["tokenization_differs"]
    assert check["tokenization_texts"] == 7 and check["prompt_tokens"] > 10
    assert check["logits_rel_error"] < 1e-5
    assert check_generates(llama / "f16.gguf", 8) == 8


def test_llama_gguf_metadata(llama):
    import gguf

    r = gguf.GGUFReader(str(llama / "f16.gguf"))

    def field(key):
        return r.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.freq_base") == 100000.0 and field("llama.rope.dimension_count") == 64
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.pre") == "smollm" and field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template").startswith("{% for message in messages %}")
    tokens = r.get_field("tokenizer.ggml.tokens")
    assert bytes(tokens.parts[tokens.data[field("tokenizer.ggml.eos_token_id")]]).decode() == "<|im_end|>"
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp uses the embedding


def test_without_the_row_permutation_logits_are_wrong(llama, tmp_path, monkeypatch):
    """The check can fail: the same converter without llama.cpp's query/key permutation is far off."""
    import inferlab.gguf.convert as conv

    monkeypatch.setattr(conv, "permute_rows", lambda w, n_head: w)
    convert(llama / "hf", tmp_path / "plain.gguf", "f32")
    assert logits_error(tmp_path / "plain.gguf", llama / "hf")["logits_rel_error"] > 1e-2


def test_quantized_files_say_which_tensors_fell_back(smol_layer):
    """Rows of 576 fit no k-quant block (256): llama.cpp stores them in other types. Every file says what it holds,
    from llama.cpp's own report and the file's tensor table, so q4_k_m is not taken for 4.9 bits."""
    root, done = smol_layer
    q4km = holds("q4_k_m", tensor_stats(root / "q4_k_m.gguf"), done["q4_k_m"]["fallbacks"])
    table = {name: ttype for name, _, ttype, _ in read_tensor_table(root / "q4_k_m.gguf")}
    fell = done["q4_k_m"]["fallbacks"]
    assert set(fell) == {f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                        "ffn_up")}
    assert all(table[name] == f["stored"] for name, f in fell.items())  # the file holds what llama.cpp said
    assert table["blk.0.ffn_down.weight"].endswith("_K")  # 1536 = 6 x 256: a real k-quant
    assert q4km["fallback_tensors"] == 6 and q4km["matrices"] == 8
    assert q4km["label"].startswith("q4_k_m (6 of 8 matrices fell back: ")
    assert q4km["label"].endswith(f"; {tensor_stats(root / 'q4_k_m.gguf')['bits_per_weight']:.2f} bpw)")
    assert {f["tensors"] for f in q4km["fallbacks"]} >= {"blk.*.attn_q.weight", "blk.*.ffn_up.weight"}
    q40 = holds("q4_0", tensor_stats(root / "q4_0.gguf"), done["q4_0"]["fallbacks"])
    assert q40["fallbacks"] == [{"tensors": "token_embd.weight", "count": 1, "required": "Q6_K", "stored": "Q8_0"}]
    assert holds("q4_0", tensor_stats(root / "q4_0.gguf"), None)["label"].startswith(
        "q4_0 (fallbacks not reported by llama.cpp")


def test_tensor_table_read_fast_agrees_with_gguf_reader(smol_layer):
    import gguf

    root, _ = smol_layer
    for name in ("f16", "q4_k_m"):
        ours = read_tensor_table(root / f"{name}.gguf")
        theirs = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes))
                  for t in gguf.GGUFReader(str(root / f"{name}.gguf")).tensors]
        assert ours == theirs


def test_int4_paths_take_the_largest_group_each_row_divides(smol_layer):
    """int4-inductor on SmolLM2's 576-wide rows: every projection quantized (none left in 16 bits) with the group
    its packing allows (32: it splits rows in halves of 288), the 1536-wide one with 128, and the load figures say
    so instead of "group size 128". torchao's int4 takes 64 on 576 (128 would leave those layers unquantized)."""
    import torch

    from inferlab.backends import get_backend
    from inferlab.backends.int4 import group_size_for, torchao_group_size

    root, _ = smol_layer
    ref = get_backend("hf")({"model_dir": str(root / "hf"), "precision": "fp32", "device": "cpu"})
    ref.load()
    b = get_backend("hf")({"model_dir": str(root / "hf"), "precision": "int4-inductor", "device": "cpu"})
    info = b.load()
    assert info["int4_group_sizes"] == {"32": 6, "128": 1}
    assert info["quantization"].startswith("int4 weight-only, asymmetric, group sizes 32 (6 projections) and 128 (1)")
    assert "7 projections quantized, 0 kept in 16 bits" in info["quantization"]
    for name in ("self_attn.q_proj", "mlp.down_proj"):  # every weight within half a step of its group's scale
        q = b.model.model.layers[0].get_submodule(name)
        w = ref.model.model.layers[0].get_submodule(name).weight
        step = q.scale.repeat_interleave(q.group_size, dim=1)
        assert torch.all((q.dequantize() - w).abs() <= step / 2 + 1e-6) and not torch.equal(q.dequantize(), w)
    assert [torchao_group_size(k) for k in (576, 1536, 2560, 192, 100)] == [64, 128, 128, 64, None]
    assert [group_size_for(k) for k in (576, 1536)] == [32, 128]
    assert b.model.model.layers[0].mlp.down_proj.scale.shape == (576, 1536 // 128)
