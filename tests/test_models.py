"""Model acquisition: the built models (deterministic, portable tokenizer), the Hub path's failure modes and
its offline routes (local folder, Hub cache)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from inferlab.config import compose
from inferlab.models.acquire import PROVENANCE, ModelUnavailable, acquire, weights_sha256


def digest(folder):
    files = sorted(p for p in folder.iterdir() if p.name != PROVENANCE)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_tiny_phi_builds_deterministically_in_seconds(project):
    cfg = compose(["model=tiny-phi"])
    t0 = time.perf_counter()
    a = acquire(cfg.model, project / "a")
    assert time.perf_counter() - t0 < 30
    b = acquire(cfg.model, project / "b")
    assert digest(project / "a") == digest(project / "b")
    # the weights' digest, in the provenance every stage's records take their model from: the same build, the same
    # digest; it covers the weight files' bytes (a changed byte changes it)
    assert a["weights_sha256"] == b["weights_sha256"] and len(a["weights_sha256"]) == 64
    with (project / "b" / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert weights_sha256(project / "b") != a["weights_sha256"]
    assert a["weights"] == "random" and a["source"] == "tiny"
    conf = json.loads((project / "a" / "config.json").read_text())
    assert conf["architectures"] == ["PhiForCausalLM"]
    assert conf["hidden_size"] == 256 and conf["intermediate_size"] == 1024


def test_tiny_tokenizer_loads_portably_with_left_padding(tiny_hf):
    from transformers import AutoTokenizer

    tcfg = json.loads((tiny_hf / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # not TokenizersBackend: transformers 4 loads it
    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    assert tok.padding_side == "left"
    batch = tok(["a", "a much longer piece of text"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id  # padded on the left
    text = "The river carries sand and stones."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips


def test_tiny_model_generates_fixed_length(tiny_hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf))
    ids = tok(["The library opened at nine"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] - ids["input_ids"].shape[1] == 12
    assert torch.isfinite(model(**ids).logits).all()


def test_phi2_random_architecture_matches_phi2():
    import torch
    from transformers import PhiForCausalLM

    from inferlab.models.build import phi_config

    cfg = compose(["model=phi-2-random"])
    with torch.device("meta"):
        model = PhiForCausalLM(phi_config(cfg.model, eos_id=0))
    n = sum(p.numel() for p in model.parameters())
    assert 2.77e9 < n < 2.79e9  # Phi-2: 2.78B parameters
    rope = getattr(model.config, "rope_parameters", None) or {}
    assert rope.get("partial_rotary_factor", getattr(model.config, "partial_rotary_factor", None)) == 0.4


def test_built_config_keeps_rope_settings_for_transformers_4(tiny_hf):
    conf = json.loads((tiny_hf / "config.json").read_text())
    assert conf["partial_rotary_factor"] == 0.5 and conf["rope_theta"] == 10000.0


@pytest.mark.parametrize("choice", [["model=phi-2"], ["model=smollm2-135m", "model.source=hub"]])
def test_hub_unreachable_fails_fast_naming_the_options(project, monkeypatch, choice):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(project / "empty-cache"))
    cfg = compose(choice)
    out = project / "models" / cfg.model.name / "hf"
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as e:
        acquire(cfg.model, out)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    for text in ("cannot be reached", "model.path=", "HF_HUB_OFFLINE=1", "model=tiny-phi", "model=phi-2-random"):
        assert text in msg
    assert not out.exists()  # nothing half-downloaded for DVC to take as finished
    assert not any(p.is_file() for p in (project / "models").rglob("*"))


def test_download_stage_exits_nonzero_and_records_the_failure(project):
    import sys

    from inferlab import records

    from .conftest import run

    r = run([sys.executable, "stages/download.py", "model=phi-2"], cwd=project, check=False,
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(project / "empty-cache"),
                 "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"})
    assert r.returncode != 0 and "model.path=" in r.stderr
    recs = records.read_all((project / "results" / "download").glob("*.jsonl"))
    assert [x.status for x in recs] == ["failed"] and "cannot be reached" in recs[0].reason
    assert not (project / "models" / "phi-2").exists()


def test_local_model_path_is_used_instead_of_the_hub(project, tiny_hf, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cfg = compose(["model=phi-2", f"model.path={tiny_hf}"])
    prov = acquire(cfg.model, project / "models" / "phi-2" / "hf")
    assert prov["origin"] == str(tiny_hf) and prov["weights"] == "real"
    assert (project / "models" / "phi-2" / "hf" / "model.safetensors").exists()


def test_offline_hub_cache_is_used(project, tiny_hf, monkeypatch):
    """HF_HUB_OFFLINE=1 with the model in the Hugging Face cache: the real hub client resolves it there."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = project / "hf-cache"
    snap = cache / "models--microsoft--phi-2" / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in tiny_hf.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    cfg = compose(["model=phi-2", f"model.revision={revision}"])
    prov = acquire(cfg.model, project / "models" / "phi-2" / "hf")
    assert prov["revision"] == revision
    assert "model.safetensors" in prov["files"] and "config.json" in prov["files"]
