"""decode: kernels, the hand-written decode step (backends/decode_step.py): on the CPU its kernels run as their torch
reference (backends/step_kernels.py), the same function the Triton kernels compute (those are checked against it
on the GPU by scripts/step_kernels_check.py, whose output is docs/step-kernels-h200.txt)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inferlab.backends import step_kernels as sk
from inferlab.backends.base import BackendUnavailable
from inferlab.backends.hf import HFBackend
from inferlab.bench.grid import hf_points
from inferlab.config import ConfigError, compose

from .conftest import ROOT


def test_the_kernel_step_gives_generates_tokens(tiny_hf, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch references, whatever the shell says
    base = {"model_dir": str(tiny_hf), "device": "cpu", "attn": "sdpa", "threads": 2}
    plain = HFBackend({**base, "precision": "fp32", "kv_cache": "dynamic"})
    plain.load()
    ids = plain.tokenize("The weather today is nice and the")
    want = plain.request([ids], 24).output_ids
    step = HFBackend({**base, "precision": "fp32", "kv_cache": "static", "decode": "kernels", "fuse_block": True})
    assert step.load()["step_kernels"] == "torch reference"  # recorded with the point
    for _ in range(2):  # the second request resets the cache the step reads and writes
        got = step.request([ids], 24)
        assert got.output_ids == want
        assert got.generated_tokens == 24 and len(got.token_times) == 24
    assert type(step.decoder.kernel_step).__name__ == "DecodeStep" and not step.decoder.kernel_step.triton
    with pytest.raises(BackendUnavailable, match="batch 1"):
        step.request([ids, ids], 4)


def test_a_latency_point_records_the_digest_of_its_tokens(tiny_hf):
    """The bench records a digest of each point's generated tokens: generate() and the kernel step, fed the same
    prompts, record the same one (the report says so for every decode loop of a sweep)."""
    from inferlab.bench.scenarios import latency

    base = {"model_dir": str(tiny_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "precision": "fp32"}
    folder = tiny_hf.parents[2] / "data" / "prompts"
    digests = []
    for extra in ({"kv_cache": "dynamic"}, {"kv_cache": "static", "decode": "kernels", "fuse_block": True}):
        be = HFBackend({**base, **extra})
        be.load()
        metrics, _ = latency(be, folder, prompt_tokens=12, new_tokens=10, batch=1, warmup=0, repetitions=2)
        digests.append(metrics["output_digest"])
    assert digests[0] == digests[1] and len(digests[0]) == 16


def test_the_kernel_step_over_int4_weights_gives_the_graph_loops_tokens(tiny_hf):
    base = {"model_dir": str(tiny_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "precision": "int4-inductor",
            "kv_cache": "static", "fuse_block": True}
    graph = HFBackend({**base, "decode": "graph"})
    graph.load()
    ids = graph.tokenize("Once upon a time there was")
    kernels = HFBackend({**base, "decode": "kernels"})
    kernels.load()
    assert kernels.request([ids], 16).output_ids == graph.request([ids], 16).output_ids


def test_the_kernel_step_needs_phis_fused_block(tiny_hf):
    be = HFBackend({"model_dir": str(tiny_hf), "device": "cpu", "precision": "fp32", "kv_cache": "static",
                    "decode": "kernels"})
    be.load()
    ids = be.tokenize("Hello there")
    with pytest.raises(BackendUnavailable, match="fuse_block: true"):
        be.request([ids], 4)


def test_reference_gemv_splits_activates_and_adds_the_residual_in_place():
    torch.manual_seed(0)
    n, k, split = 12, 8, 5
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(k)
    out, out2 = torch.full((split,), float("nan")), torch.full((n - split,), float("nan"))
    sk.ref_gemv(x, w, b, act_from=split, out=out, split=split, out2=out2)
    y = w @ x + b
    torch.testing.assert_close(out, y[:split])
    torch.testing.assert_close(out2, torch.nn.functional.gelu(y[split:], approximate="tanh"))
    res = torch.randn(n)
    before = res.clone()
    sk.ref_gemv(x, w, None, res=res, out=res)
    torch.testing.assert_close(res, w @ x + before)


def test_reference_attention_matches_softmax_attention_and_writes_the_cache():
    torch.manual_seed(1)
    h, d, rot, length, pos = 2, 8, 4, 10, 6
    qkv = torch.randn(3 * h * d)
    kc, vc = torch.randn(1, h, length, d), torch.randn(1, h, length, d)
    ang = torch.rand(length, rot // 2) * 3
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    out = torch.full((h * d,), float("nan"))
    sk.ref_attention(qkv, kc, vc, cos, sin, torch.tensor([[pos]]), out=out, scale=d ** -0.5)
    q, k, v = qkv.view(3, h, d)

    def rope(t):  # rotate-half over the first `rot` features
        r = t[:, :rot]
        half = torch.cat([-r[:, rot // 2:], r[:, : rot // 2]], -1)
        return torch.cat([r * cos[pos] + half * sin[pos], t[:, rot:]], -1)

    torch.testing.assert_close(kc[0, :, pos], rope(k))
    torch.testing.assert_close(vc[0, :, pos], v)
    want = torch.nn.functional.scaled_dot_product_attention(rope(q)[:, None], kc[0, :, : pos + 1],
                                                            vc[0, :, : pos + 1])
    torch.testing.assert_close(out, want.reshape(-1))


def test_kernel_step_points_in_the_grid():
    point = "{precision: fp16, batch_size: 1, kv_cache: static, decode: kernels, fuse_block: true}"
    cfg = compose(["bench_gpu=kernels", "model=phi-2-random"])
    assert cfg.model_architecture() == "PhiForCausalLM"  # phi-2-random: built here, its family says so
    points = {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())}
    p = points["hf-fp16-b1-static-sdpa-block-kernels"]
    assert p.skip is None and p.settings["decode"] == "kernels" and p.settings["fuse_block"] is True
    assert p.group[-1] == p.name  # a process of its own, as every captured graph gets
    wrong = {"{precision: fp16, batch_size: 1, kv_cache: static, decode: kernels}": "fuse_block: true",
             point.replace("batch_size: 1", "batch_size: 4"): "takes batch_size: 1 (its kernels take one row), got 4",
             point.replace("fp16", "nf4"): "takes precision: one of fp32, fp16, bf16, int4-inductor",
             point.replace("decode:", "compile: true, decode:"): "compile: false",
             point.replace("decode:", "gemv: triton, decode:"): "gemv: triton has no effect there",
             point.replace("static", "dynamic"): "static KV cache"}
    for extra, reason in wrong.items():
        cfg = compose(["bench_gpu=fast", "model=phi-2-random", f"bench_gpu.hf.extra_points=[{extra}]"])
        (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
                if p.name.endswith("kernels")]
        assert p.skip and reason in p.skip, (extra, p.skip)


@pytest.mark.slow
def test_the_triton_kernels_compute_their_references_under_the_interpreter():
    """The Triton kernels themselves (backends/step_triton.py), run on the CPU by Triton's interpreter at small
    shapes in fp16 and fp32, against their torch references: every GEMV epilogue (bias, GELU from a row on, the
    split output, the residual in place, Llama's SiLU(gate) * up; fp16 and int4 weights), the layer norm, the RMS
    norm, and attention (Phi's and grouped-query) at the first, a chunk-boundary and the last position. The same
    check runs on the GPU at Phi-2's and SmolLM2's shapes (docs/step-kernels-h200.txt)."""
    import triton  # noqa: F401  (installed by setup.sh: without it this test fails, it is not skipped)

    for flags in (["--fp16"], []):  # fp16: where the kernels round (limit 2e-4); fp32: the arithmetic (1e-5)
        r = subprocess.run([sys.executable, "scripts/step_kernels_check.py", "--small", *flags], cwd=ROOT,
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "cpu (Triton interpreter)" in r.stdout
        checked = [line for line in r.stdout.splitlines() if "rel err" in line]
        assert len(checked) == 39 and r.stdout.splitlines()[-1].endswith("PASS"), r.stdout


# --- Llama blocks (tiny-llama: SmolLM2's code paths; grouped-query attention, RMSNorm, SiLU-gated MLP, tied head) ---

def teacher_forced_logits(be, seq: list[int], n_prompt: int, triton: bool = False):
    """The kernel step fed seq from n_prompt on over a prefilled static cache, against the model's forward over the
    whole sequence: (the step's logits, the forward's) at each fed position, as (n, vocab) fp32 tensors."""
    from inferlab.backends.decode_step import DecodeStep

    dec, model = be.decoder, be.model
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, n_prompt:].float()
        dec.static_cache(1, len(seq) + 1)
        dec.cache.reset()
        dec.prefill(torch.tensor([seq[:n_prompt]]))
        step = DecodeStep(model, triton=triton)
        step.bind(dec.cache, len(seq) + 1)
        got = []
        for p in range(n_prompt, len(seq)):
            nxt = step(torch.tensor([[seq[p]]]), torch.tensor([[p]]))
            assert nxt.shape == (1, 1) and int(nxt) == int(step.logits.argmax())
            got.append(step.logits.float().clone())
    return torch.stack(got), want, step


def test_the_llama_kernel_step_gives_generates_tokens_and_the_models_logits(tiny_llama_hf, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = {"model_dir": str(tiny_llama_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "precision": "fp32"}
    plain = HFBackend({**base, "kv_cache": "dynamic"})
    plain.load()
    ids = plain.tokenize("The weather today is nice and the")
    want = plain.request([ids], 24).output_ids
    step = HFBackend({**base, "kv_cache": "static", "decode": "kernels"})
    assert step.load()["step_kernels"] == "torch reference"
    for _ in range(2):  # the second request resets the cache the step reads and writes
        got = step.request([ids], 24)
        assert got.output_ids == want and got.generated_tokens == 24
    made = step.decoder.kernel_step
    assert made.llama and made.kv_heads == 2 and made.heads == 4 and made.launches is None  # torch: no launches
    logits, ref, _ = teacher_forced_logits(step, ids + want[0], len(ids))
    assert logits.shape == ref.shape == (24, 1024)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_the_llama_kernel_step_in_fp16_and_int4_follows_the_model(tiny_llama_hf, monkeypatch):
    """fp16 (the GPU's precision, run on the CPU): the step's logits fed generate()'s tokens stay within fp16
    rounding of the model's forward; int4-inductor ([q; k; v] and [gate; up] concatenated from the packed layers):
    the same greedy tokens as the graph loop over the model's own int4 layers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = {"model_dir": str(tiny_llama_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "kv_cache": "static"}
    half = HFBackend({**base, "precision": "fp16", "decode": "kernels"})
    half.load()
    ids = half.tokenize("Once upon a time there was")
    seq = ids + half.request([ids], 16).output_ids[0]
    logits, ref, _ = teacher_forced_logits(half, seq, len(ids))
    assert float((logits - ref).abs().max() / ref.std()) < 0.01
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    graph = HFBackend({**base, "precision": "int4-inductor", "decode": "graph"})
    graph.load()
    kernels = HFBackend({**base, "precision": "int4-inductor", "decode": "kernels"})
    kernels.load()
    assert kernels.request([ids], 16).output_ids == graph.request([ids], 16).output_ids
    w_in = kernels.decoder.kernel_step.layers[0].w_in
    assert type(w_in).__name__ == "Int4Linear" and w_in.out_features == (4 + 2 + 2) * 64


def test_reference_rms_norm_glu_and_grouped_attention_match_llamas_modules():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(2)
    for dtype in (torch.float32, torch.float16):
        norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
        norm.weight.data = (1 + 0.1 * torch.randn(16)).to(dtype)
        x = (torch.randn(16) * 3).to(dtype)
        out = torch.full((16,), float("nan"), dtype=dtype)
        sk.ref_rms_norm(x, norm.weight, norm.variance_epsilon, out=out)
        assert torch.equal(out, norm(x))  # the same roundings
        conf = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, hidden_act="silu")
        mlp = LlamaMLP(conf).to(dtype)
        w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        out = torch.full((24,), float("nan"), dtype=dtype)
        sk.ref_gemv(x, w, None, out=out, glu_rows=True)
        want = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        torch.testing.assert_close(out, want, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
    h, kv, d, length, pos = 6, 2, 8, 10, 7
    qkv = torch.randn((h + 2 * kv) * d)
    kc, vc = torch.randn(1, kv, length, d), torch.randn(1, kv, length, d)
    ang = torch.rand(length, d // 2) * 3
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    out = torch.full((h * d,), float("nan"))
    sk.ref_attention(qkv, kc, vc, cos, sin, torch.tensor([[pos]]), out=out, scale=d ** -0.5)
    q, k, v = qkv.view(-1, d).split([h, kv, kv])

    def rope(t):  # rotate-half over the whole head
        return t * cos[pos] + torch.cat([-t[:, d // 2:], t[:, : d // 2]], -1) * sin[pos]

    torch.testing.assert_close(kc[0, :, pos], rope(k))
    torch.testing.assert_close(vc[0, :, pos], v)
    want = torch.nn.functional.scaled_dot_product_attention(rope(q)[:, None], kc[0, :, : pos + 1],
                                                            vc[0, :, : pos + 1], enable_gqa=True)
    torch.testing.assert_close(out, want.reshape(-1))


def test_kernel_step_points_for_llama_in_the_grid():
    point = "{precision: fp16, batch_size: 1, kv_cache: static, decode: kernels}"
    cfg = compose(["bench_gpu=fast", "model=tiny-llama", f"bench_gpu.hf.extra_points=[{point}]"])
    assert cfg.model_architecture() == "LlamaForCausalLM"
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
            if p.name.endswith("kernels")]
    assert p.skip is None and p.name == "hf-fp16-b1-static-sdpa-kernels"
    wrong = {point.replace("decode:", "fuse_block: true, decode:"): "fuses the layer's projections itself; "
                                                                   "fuse_block applies to Phi's parallel block only",
             point.replace("decode:", "fuse_qkv: true, decode:"): "leave fuse_qkv unset"}
    for extra, reason in wrong.items():
        cfg = compose(["bench_gpu=fast", "model=tiny-llama", f"bench_gpu.hf.extra_points=[{extra}]"])
        (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
                if p.name.endswith("kernels")]
        assert p.skip and reason in p.skip, (extra, p.skip)
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, "GPT2LMHeadModel")
            if p.name.endswith("kernels")]
    assert p.skip == "decode: kernels runs PhiForCausalLM and LlamaForCausalLM; this model is GPT2LMHeadModel"


def test_the_int4_gemv_knob_picks_the_steps_int4_kernel():
    point = "{precision: int4-inductor, batch_size: 1, kv_cache: static, decode: kernels, int4_gemv: splitk}"
    cfg = compose(["bench_gpu=fast", "model=tiny-llama", f"bench_gpu.hf.extra_points=[{point}]"])
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
            if "splitk" in p.name]
    assert p.skip is None and p.settings["int4_gemv"] == "splitk" and p.name.endswith("-splitk-kernels")
    for wrong in (point.replace("int4-inductor", "fp16"), point.replace("decode: kernels", "decode: graph")):
        cfg = compose(["bench_gpu=fast", "model=tiny-llama", f"bench_gpu.hf.extra_points=[{wrong}]"])
        (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
                if "splitk" in p.name]
        assert p.skip == ("int4_gemv: splitk picks decode: kernels' int4 GEMV: it applies to decode: kernels with "
                          "precision: int4-inductor"), (wrong, p.skip)
    with pytest.raises(ConfigError, match="int4_gemv.*'wide'.*rows, splitk"):
        compose(["bench_gpu=fast", f"bench_gpu.hf.extra_points=[{point.replace('splitk', 'wide')}]"])


def test_fuse_norm_puts_the_rms_norm_in_the_gemvs_and_keeps_the_tokens(tiny_llama_hf, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = {"model_dir": str(tiny_llama_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "precision": "fp32",
            "kv_cache": "static", "decode": "kernels"}
    plain, fused = HFBackend(base), HFBackend({**base, "fuse_norm": True})
    plain.load()
    fused.load()
    ids = plain.tokenize("The weather today is nice and the")
    assert fused.request([ids], 12).output_ids == plain.request([ids], 12).output_ids
    assert fused.decoder.kernel_step.fuse_norm and not plain.decoder.kernel_step.fuse_norm
    torch.manual_seed(3)
    x, w, nw = torch.randn(16, dtype=torch.float16), torch.randn(8, 16, dtype=torch.float16), torch.rand(16) + 0.5
    h, out, want = (torch.empty(16, dtype=torch.float16), torch.empty(8, dtype=torch.float16),
                    torch.empty(8, dtype=torch.float16))
    sk.ref_gemv(x, w, None, out=out, norm=(nw.half(), 1e-5))
    sk.ref_rms_norm(x, nw.half(), 1e-5, out=h)
    sk.ref_gemv(h, w, None, out=want)
    assert torch.equal(out, want)
    cfg = compose(["bench_gpu=fast", "model=tiny-llama", "bench_gpu.hf.extra_points=[{precision: fp16, batch_size: 1, "
                   "kv_cache: static, decode: kernels, fuse_norm: true}]"])
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
            if "normfused" in p.name]
    assert p.skip is None and p.name == "hf-fp16-b1-static-sdpa-normfused-kernels"
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, "PhiForCausalLM")
            if "normfused" in p.name]
    assert p.skip and "applies to decode: kernels on LlamaForCausalLM" in p.skip
    for decode, skip in (("kernels", None), ("graph", "fuse_attention is decode: kernels' one-launch attention: it "
                                                      "applies to decode: kernels")):
        cfg = compose(["bench_gpu=fast", "model=tiny-llama", "bench_gpu.hf.extra_points=[{precision: fp16, batch_size: "
                       f"1, kv_cache: static, decode: {decode}, fuse_attention: true}}]"])
        (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
                if "attn1" in p.name]
        assert p.skip == skip and p.name.endswith(f"-attn1-{decode}")


def test_the_kernel_step_names_the_architectures_it_runs():
    from transformers import GPT2Config, GPT2LMHeadModel

    from inferlab.backends.decode_step import DecodeStep

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(BackendUnavailable, match="runs PhiForCausalLM and LlamaForCausalLM; this model is "
                                                 "GPT2LMHeadModel"):
        DecodeStep(model, triton=False)


INTERPRETED_LLAMA_STEP = """
import json, sys
from inferlab.backends.hf import HFBackend
from inferlab.bench.scenarios import summarize_requests
be = HFBackend(json.loads(sys.argv[1]))
ran = be.load()["step_kernels"]
r = be.request([json.loads(sys.argv[2])], int(sys.argv[3]))
print(json.dumps({"ran": ran, "tokens": r.output_ids, "launches": summarize_requests([r])[0].get("step_launches")}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"precision": "fp32"},
                                   {"precision": "int4-inductor", "int4_gemv": "splitk", "fuse_norm": True,
                                    "fuse_attention": True}],
                         ids=["fp32", "int4-splitk-fused"])
def test_the_llama_step_on_the_interpreted_triton_kernels_gives_the_references_tokens(tiny_llama_hf, monkeypatch,
                                                                                     extra):
    """The whole Llama step on the Triton kernels (Triton's interpreter; fp32 weights, and int4 ones on the split-K
    kernel with each RMSNorm in its GEMV's prologue and attention in one launch) gives the torch-reference step's
    greedy tokens, and its point records the launches per step: 8 per layer (attention is two) and 4 more (the
    embedding, the final norm, the head, the argmax); fused, 5 per layer and 3 more."""
    import json

    import triton  # noqa: F401  (installed by setup.sh: without it this test fails, it is not skipped)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    settings = {"model_dir": str(tiny_llama_hf), "device": "cpu", "attn": "sdpa", "threads": 2, "kv_cache": "static",
                "decode": "kernels", **extra}
    be = HFBackend(settings)
    be.load()
    ids = be.tokenize("Once upon a time")
    want = be.request([ids], 3).output_ids
    r = subprocess.run([sys.executable, "-c", INTERPRETED_LLAMA_STEP, json.dumps(settings), json.dumps(ids), "3"],
                       cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    layers = len(be.model.model.layers)
    launches = 5 * layers + 3 if extra.get("fuse_norm") else 8 * layers + 4
    assert got == {"ran": "triton, interpreted", "tokens": want, "launches": launches}


@pytest.mark.slow
def test_the_llama_step_at_smollm2s_shapes(tmp_path, monkeypatch):
    """One layer of SmolLM2-135M's shapes (hidden 576, 9 heads over 3 key/value heads, intermediate 1536; int4
    groups of 32 on 576-wide rows, 128 on down_proj's): the step's tokens equal generate()'s in fp32 and the graph
    loop's over the same int4 layers."""
    from inferlab.models.acquire import acquire

    from .test_llama import SMOL_LAYER

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    acquire(compose(SMOL_LAYER).model, tmp_path / "hf")
    base = {"model_dir": str(tmp_path / "hf"), "device": "cpu", "attn": "sdpa", "threads": 2}
    plain = HFBackend({**base, "precision": "fp32", "kv_cache": "dynamic"})
    plain.load()
    ids = plain.tokenize("Hello there, how are")
    step = HFBackend({**base, "precision": "fp32", "kv_cache": "static", "decode": "kernels"})
    step.load()
    assert step.request([ids], 12).output_ids == plain.request([ids], 12).output_ids
    made = step.decoder.kernel_step
    assert (made.heads, made.kv_heads, made.head_dim, made.split) == (9, 3, 64, (9 + 2 * 3) * 64)
    graph = HFBackend({**base, "precision": "int4-inductor", "kv_cache": "static", "decode": "graph"})
    graph.load()
    kernels = HFBackend({**base, "precision": "int4-inductor", "kv_cache": "static", "decode": "kernels"})
    kernels.load()
    assert kernels.request([ids], 12).output_ids == graph.request([ids], 12).output_ids
    layer = kernels.decoder.kernel_step.layers[0]
    assert (layer.w_in.group_size, layer.w_up.group_size, layer.w_down.group_size) == (32, 32, 128)


def test_the_llama_kernels_sweep_runs_every_point_on_a_llama_model():
    """bench_gpu=kernels-llama: none of its transformers points is skipped on a Llama model, and on Phi its
    decode: kernels points are, with the reason (Phi's step needs fuse_block)."""
    cfg = compose(["bench_gpu=kernels-llama", "model=tiny-llama"])
    points = hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, cfg.model_architecture())
    assert len(points) == 7 and all(p.skip is None for p in points), [(p.name, p.skip) for p in points]
    phi = hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16, "PhiForCausalLM")
    kernels = [p for p in phi if p.name.endswith("kernels")]
    assert len(kernels) == 5 and all(p.skip for p in kernels)


def test_the_kernel_check_fails_on_an_unwritten_output():
    """A kernel that leaves its NaN-poisoned output unwritten has error NaN: the check must fail on it,
    wherever it comes among the checks (max() kept the first value against a NaN, so it passed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_kernels_check", ROOT / "scripts" / "step_kernels_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    nan = float("nan")
    assert check.worst_of([1e-6, 3e-6, 2e-6]) == 3e-6
    for errs in ([1e-6, nan, 2e-6], [nan, 1e-6], [1e-6, nan]):
        worst = check.worst_of(errs)
        assert not worst < 2e-4, errs  # main() passes only when worst < limit
