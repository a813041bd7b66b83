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
from inferlab.config import compose

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
    points = {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16)}
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
        (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16) if p.name.endswith("kernels")]
        assert p.skip and reason in p.skip, (extra, p.skip)


@pytest.mark.slow
def test_the_triton_kernels_compute_their_references_under_the_interpreter():
    """The Triton kernels themselves (backends/step_triton.py), run on the CPU by Triton's interpreter at small
    shapes in fp16 and fp32, against their torch references: every GEMV epilogue (bias, GELU from a row on, the
    split output, the residual in place; fp16 and int4 weights), the layer norm, and attention at the first, a
    chunk-boundary and the last position. The same check runs on the GPU at Phi-2's shapes
    (docs/step-kernels-h200.txt)."""
    import triton  # noqa: F401  (installed by setup.sh: without it this test fails, it is not skipped)

    for flags in (["--fp16"], []):  # fp16: where the kernels round (limit 2e-4); fp32: the arithmetic (1e-5)
        r = subprocess.run([sys.executable, "scripts/step_kernels_check.py", "--small", *flags], cwd=ROOT,
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "cpu (Triton interpreter)" in r.stdout
        checked = [line for line in r.stdout.splitlines() if "rel err" in line]
        assert len(checked) == 11 and r.stdout.splitlines()[-1].endswith("PASS"), r.stdout
