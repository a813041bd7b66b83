"""GGUF conversion and quantization on the tiny model, through real llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inferlab import records
from inferlab.gguf.convert import tensor_stats
from inferlab.gguf.pipeline import check_generates, logits_error


def gguf(project, ftype):
    return project / "models" / "tiny-phi" / "gguf" / f"tiny-phi-{ftype}.gguf"


def test_f32_reproduces_transformers_logits(tiny_project, tiny_hf):
    check = logits_error(gguf(tiny_project, "f32"), tiny_hf)
    assert check["same_tokenization"]
    assert check["prompt_tokens"] > 10
    assert check["logits_rel_error"] < 1e-3


def test_same_tokenization_on_varied_text(tiny_project, tiny_hf):
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    llm = llama_cpp.Llama(model_path=str(gguf(tiny_project, "f16")), vocab_only=True, verbose=False)
    for text in ["def f(x):\n    return x ** 2  # square", "Numbers 3.14, 1e-5 and 42!", "  leading spaces\tand tabs",
                 "ünïcödé and émoji 🙂", "The river's banks"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"], text


@pytest.mark.parametrize("ftype", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_every_file_loads_and_generates(tiny_project, ftype):
    assert check_generates(gguf(tiny_project, ftype), 16) == 16


def test_quantized_files_are_smaller_with_fewer_bits(tiny_project):
    stats = {t: tensor_stats(gguf(tiny_project, t)) for t in ("f32", "f16", "q8_0", "q4_k_m", "q4_0")}
    bpw = {t: s["bits_per_weight"] for t, s in stats.items()}
    assert bpw["f32"] == 32.0
    assert 16 < bpw["f16"] < 16.2  # F32 norms and biases add a little
    assert bpw["f32"] > bpw["f16"] > bpw["q8_0"] > bpw["q4_k_m"] > bpw["q4_0"] > 4
    assert "Q4_K" in stats["q4_k_m"]["tensor_types"]  # hidden 256: no fallback away from k-quants
    assert len({s["parameters"] for s in stats.values()}) == 1


def test_gguf_metrics_and_records(tiny_project):
    metrics = json.loads((tiny_project / "metrics" / "gguf.json").read_text())
    assert metrics["model"] == "tiny-phi" and metrics["weights"] == "random"
    assert set(metrics["types"]) == {"f32", "f16", "q8_0", "q4_k_m", "q4_0"}
    for t, m in metrics["types"].items():
        assert m["status"] == "ok", t
        assert m["file_bytes"] == gguf(tiny_project, t).stat().st_size
    assert metrics["types"]["f32"]["logits_rel_error"] < 1e-3
    recs = records.read_all((tiny_project / "results" / "convert").glob("*.jsonl"))
    assert {r.name for r in recs} == set(metrics["types"])
    r = recs[0]
    assert r.model["weights"] == "random" and r.model["name"] == "tiny-phi"
    assert r.environment["libraries"]["llama-cpp-python"] and r.environment["hardware"]["cores_logical"] >= 1
    assert "commit" in r.environment["git"] and r.config["convert"]["quants"] == ["q8_0", "q4_k_m", "q4_0"]


def test_logits_check_catches_a_wrong_model(tiny_project, tiny_hf, tmp_path):
    """The check can fail: a GGUF from other weights gives a large error."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from inferlab.gguf.convert import convert

    other = tmp_path / "hf"
    shutil.copytree(tiny_hf, other)
    weights = load_file(str(other / "model.safetensors"))
    key = next(k for k in weights if k.endswith("fc1.weight"))
    weights[key] = np.ascontiguousarray(weights[key][::-1])
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    convert(other, tmp_path / "other.gguf", "f32")
    assert logits_error(tmp_path / "other.gguf", tiny_hf)["logits_rel_error"] > 1e-2
