"""Issue 9's measuring tools on the CPU: the kernel-level profile of decode steps (its timeline arithmetic on a
constructed timeline, and a real profile of tiny-phi), prompt-lookup decoding with counted acceptance, per-point
inductor options, llama.cpp's GPU points where llama-cpp-python has no GPU offload, the convert stage's crash
isolation, and the report's section on all of it."""

from __future__ import annotations

import functools
import json
import os
import signal

import pytest

from inferlab import records as rec
from inferlab.backends import BackendUnavailable, get_backend
from inferlab.bench import hf_scenarios, profile
from inferlab.config import ConfigError, compose
from inferlab.gguf.pipeline import isolated
from inferlab.report.build import build

from .conftest import ROOT
from .test_report import bench


def loaded(tiny_hf, precision="fp32", **settings):
    """A transformers backend on the tiny model on the CPU, loaded: (backend, its load figures)."""
    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": precision, "device": "cpu", **settings})
    return b, b.load()

PROMPTS = ROOT / "data" / "prompts"


def test_timeline_splits_kernel_time_launch_gaps_and_host_waits():
    # two steps; times in microseconds
    timeline = [(0.0, 10.0, "nvjet_sm90_gemv"), (11.0, 21.0, "nvjet_sm90_gemv"),  # 1 us launch gap
                (40.0, 45.0, "triton_poi_fused_add"),  # 19 us: the GPU waited for the host
                (44.0, 50.0, "Memcpy DtoD"),  # overlaps the previous one: counted once
                (51.0, 61.0, "cudnn_sdpa_flash_fprop")]
    s = profile.summarize_timeline(sorted(timeline), steps=2, weight_bytes=20_000)
    assert s["span_ms_per_step"] == pytest.approx(61 / 2 / 1e3)
    assert s["kernel_ms_per_step"] == pytest.approx((10 + 10 + 10 + 10) / 2 / 1e3)  # 40..50 once, not 11 us
    assert s["launch_gap_ms_per_step"] == pytest.approx((1 + 1) / 2 / 1e3)
    assert s["host_wait_ms_per_step"] == pytest.approx(19 / 2 / 1e3)
    assert s["kernel_ms_per_step"] + s["launch_gap_ms_per_step"] + s["host_wait_ms_per_step"] == pytest.approx(
        s["span_ms_per_step"])
    assert (s["launch_gaps_per_step"], s["host_waits_per_step"], s["kernels_per_step"]) == (1.0, 0.5, 2.5)
    assert s["ms_per_step_by_kind"] == {"matmul": 0.01, "attention": 0.005, "copy": 0.003, "fused (Triton)": 0.0025}
    # 20 kB of weights read in the 10 us of matrix kernels per step: 2 GB/s
    assert s["weight_gbps_over_matmul"] == pytest.approx(2.0)
    assert s["top_kernels"][0]["name"] == "nvjet_sm90_gemv" and s["top_kernels"][0]["calls_per_step"] == 1.0
    with pytest.raises(RuntimeError, match="no device activity"):
        profile.summarize_timeline([], steps=2)


@pytest.mark.parametrize("decode", ["generate", "fast"])
def test_profile_of_real_decode_steps_on_the_cpu(tiny_hf, decode):
    loop = decode != "generate"
    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "device": "cpu",
                           "kv_cache": "static" if loop else "dynamic", "decode": decode if loop else None})
    b.load()
    point = {"batch_size": 1, "prompt_tokens": 16, "new_tokens": 8, "warmup": 1, "decode": decode}
    m, _ = profile.decode_profile(b, PROMPTS, point, "p")
    assert m["window"] == ("decode steps" if loop else "whole request (prefill included)")
    assert m["steps"] == (7 if loop else 8) and m["device_timeline"] == "CPU top-level operators"
    assert 0 < m["kernel_ms_per_step"] <= m["span_ms_per_step"]
    assert m["kernel_ms_per_step"] + m["launch_gap_ms_per_step"] + m["host_wait_ms_per_step"] == pytest.approx(
        m["span_ms_per_step"], rel=1e-3)
    assert "aten::linear" in {k["name"] for k in m["top_kernels"]} and m["ms_per_step_by_kind"]["matmul"] > 0
    assert m["weight_bytes_method"] == "storage" and m["weight_gbps_over_matmul"] > 0
    assert b.after_prefill is None  # the profiler's hook does not outlive the profile


def test_prompt_lookup_counts_acceptance_and_keeps_greedy_tokens(tiny_hf):
    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "device": "cpu", "kv_cache": "dynamic"})
    b.load()
    items = [json.loads(line) for line in (ROOT / "data" / "eval" / "items.jsonl").read_text().splitlines()]
    texts = [f"Summarize the text in one sentence.\n\nText: {i['input']}\nSummary:" for i in items
             if i["task"] == "summarization"][:4]
    plain, _ = hf_scenarios.assisted(b, texts, 0, 2, 512, 24)
    lookup, samples = hf_scenarios.assisted(b, texts, 10, 2, 512, 24)
    assert plain["requests"] == lookup["requests"] == 3  # the first text warms up
    assert plain["drafted_tokens"] == plain["accepted_tokens"] == 0 and plain["acceptance_rate"] is None
    assert plain["tokens_per_forward"]["median"] == 1.0  # one forward pass per token without lookup
    assert lookup["drafted_tokens"] > 0 and 0 <= lookup["accepted_tokens"] <= lookup["drafted_tokens"]
    assert lookup["acceptance_rate"] == pytest.approx(lookup["accepted_tokens"] / lookup["drafted_tokens"], abs=1e-4)
    # every forward pass yields its accepted candidates and one token: passes = tokens - accepted
    passes = sum(24 / t for t in samples["tokens_per_forward"])
    assert passes == pytest.approx(3 * 24 - lookup["accepted_tokens"])
    # greedy lookup is lossless in fp32: the same tokens as plain decoding, request by request
    assert lookup["outputs_sha256_each"] == plain["outputs_sha256_each"] and len(plain["outputs_sha256_each"]) == 3


def test_inductor_options_are_config_checked_and_named():
    with pytest.raises(ConfigError, match=r"bench_gpu.hf.extra_points\[0\].inductor: 'coordinate_descent' is not "
                                          r"allowed; choose one of coordinate_descent_tuning"):
        compose(["bench_gpu.hf.extra_points=[{precision: fp16, kv_cache: static, compile: true, decode: fast, "
                 "inductor: coordinate_descent}]"])
    from inferlab.bench.grid import hf_points

    cfg = compose(["model=tiny-phi", "bench_gpu=fast"])
    names = {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 2)}
    cdt = names["hf-fp16-b1-static-sdpa-compiled-cdt-fast"]
    assert cdt.settings["inductor"] == "coordinate_descent_tuning" and cdt.skip is None
    assert "inductor" not in names["hf-fp16-b1-static-sdpa-compiled-fast"].settings  # ids of older points kept
    graph = [p for p in names.values() if p.settings.get("decode") == "graph"]
    assert len({p.group for p in graph}) == len(graph)  # each graph-loop point in a worker of its own
    cfg = compose(["model=tiny-phi", "bench_gpu.hf.extra_points=[{precision: fp16, kv_cache: static, compile: true, "
                   "inductor: freezing}]"])
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 2) if p.settings.get("inductor")]
    assert "fast and graph loops" in p.skip  # generate() compiles through transformers: no options there


def test_llama_cpp_gpu_points_are_skipped_without_gpu_offload(tiny_project):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():  # pragma: no cover - a CUDA build of llama-cpp-python
        pytest.skip("this llama-cpp-python offloads to a GPU: the point would run")
    gguf = tiny_project / "models" / "tiny-phi" / "gguf" / "tiny-phi-q4_0.gguf"
    b = get_backend("llama_cpp")({"model_path": str(gguf), "n_threads": 1, "n_gpu_layers": -1})
    with pytest.raises(BackendUnavailable, match="built without GPU offload.*GGML_CUDA=on"):
        b.load()
    from inferlab.bench.gpu import gpu_llama_points

    cfg = compose(["model=tiny-phi"])
    points = gpu_llama_points(cfg, {}, 2)
    assert {p.settings["quant"] for p in points} == set(cfg.bench_gpu.llama_cpp.quants)
    assert all(p.settings["n_gpu_layers"] == -1 and p.settings["device"] == "cuda" for p in points)
    assert all(p.name.startswith("gpu-") and p.settings["n_threads"] == 2 for p in points)
    with pytest.raises(ConfigError, match="bench_gpu.llama_cpp.n_gpu_layers: 0 is not allowed"):
        compose(["bench_gpu.llama_cpp.n_gpu_layers=0"])


def _segfault() -> None:
    print("loading the model", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_in_llama_cpp_fails_the_call_with_its_output():
    with pytest.raises(RuntimeError, match=r"(?s)process died in _segfault.*loading the model"):
        isolated(_segfault)
    assert isolated(sorted, [3, 1, 2]) == [1, 2, 3]


def test_report_shows_peer_lookup_and_profiles(project):
    r = project / "results"
    bench(r, "gpu-a", "hf-fp16-b1-dynamic-sdpa", "fp16", 1, 40, 20, 25, 5.3)
    bench(r, "gpu-a", "hf-fp16-b1-static-sdpa-compiled-fast", "fp16", 1, 314, 20, 3.2, 5.3, kv_cache="static",
          decode="fast", compile=True)
    bench(r, "gpu-a", "hf-int4-ao-b1-static-sdpa-compiled-graph", "int4-ao", 1, 437, 20, 2.3, 2.2,
          kv_cache="static", decode="graph", compile=True)
    bench(r, "gpu-a", "gpu-f16-t16-b512-fa1-kvf16-generate-p64", None, 1, 0, 0, 0, 0, status="failed",
          reason="the worker process died with exit code -11 (SIGSEGV)", runtime="llama_cpp", quant="f16",
          device="cuda")
    for n, tps, acc in ((0, 39.0, None), (10, 75.4, 0.58)):
        name = f"hf-fp16-b1-{'lookup10' if n else 'plain'}-summarization"
        rec.append(r / "bench_gpu" / "gpu-a.jsonl", rec.Record(
            stage="bench_gpu", name=name, point={"runtime": "hf", "scenario": "assisted", "precision": "fp16",
                                                 "batch_size": 1, "lookup_tokens": n, "task": "summarization",
                                                 "new_tokens": 64},
            config={}, model={"name": "m", "weights": "random"}, environment={"hardware": {"id": "gpu-a"}},
            sweep_id="s", metrics={"total_tps": {"median": tps}, "acceptance_rate": acc, "requests": 8,
                                   "tokens_per_forward": {"median": 6.1 if n else 1.0},
                                   "outputs_sha256_each": ["a", "b"] if n else ["a", "c"]}))
    rec.append(r / "bench_gpu" / "gpu-a.jsonl", rec.Record(
        stage="bench_gpu", name="hf-fp16-b1-static-sdpa-compiled-fast-profile",
        point={"runtime": "hf", "scenario": "profile", "precision": "fp16", "batch_size": 1, "new_tokens": 32},
        config={}, model={"name": "m", "weights": "random"}, environment={"hardware": {"id": "gpu-a"}}, sweep_id="s",
        metrics={"window": "decode steps", "profiled_step_ms": 3.31, "kernel_ms_per_step": 2.95,
                 "launch_gap_ms_per_step": 0.24, "host_wait_ms_per_step": 0.12, "kernels_per_step": 456.5,
                 "ms_per_step_by_kind": {"matmul": 2.47}, "weight_gbps_over_matmul": 2249.2,
                 "top_kernels": [{"name": "nvjet_sm90_hsh_64x8", "ms_per_step": 0.998}]}))
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    assert "### Faster decoding" in md
    assert ("**Fastest batch-1 decoding (transformers)**: 16-bit hf-fp16-b1-static-sdpa-compiled-fast 314 tokens/s"
            in md and "4-bit hf-int4-ao-b1-static-sdpa-compiled-graph 437 tokens/s" in md and "1.39×" in md)
    assert ("**llama.cpp on this GPU (every layer offloaded, same GGUF files)**: none of its 1 points ran: the worker "
            "process died with exit code -11") in md
    assert ("**Prompt lookup (fp16, summarization, 10 candidates)**: 75.4 tokens/s per request (median of 8), "
            "acceptance 0.58, 6.1 tokens per forward pass; plain decoding of the same requests 39 tokens/s "
            "(1.93× faster); the same tokens as plain decoding in 1 of 2 requests.") in md
    assert "| hf-fp16-b1-static-sdpa-compiled-fast | s | decode steps | 3.31 | 2.95 | 0.24 | 0.12 | 456 | 2.47 |" in md


def test_llama_processes_load_llama_cpp_first_and_others_never():
    """A CUDA build of llama-cpp-python crashed beside numpy or torch loaded first, and torch after it: the
    processes the study starts for llama.cpp load it on `import inferlab`, the others (torch's) do not.
    Checked in fresh interpreters, and in a worker started for each runtime."""
    import subprocess
    import sys

    from inferlab import LLAMA_PROCESS_ENV, llama_children

    code = "import sys; import inferlab; print('llama_cpp.llama_cpp' in sys.modules, 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != LLAMA_PROCESS_ENV}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    llama = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**env, LLAMA_PROCESS_ENV: "1"})
    assert plain.stdout.split() == ["False", "False"]
    assert llama.stdout.split() == ["True", "False"]
    with llama_children():
        assert os.environ[LLAMA_PROCESS_ENV] == "1"
    assert LLAMA_PROCESS_ENV not in os.environ
    assert isolated(_llama_loaded) is True  # the convert stage's llama.cpp calls


def _llama_loaded() -> bool:
    import sys

    return "llama_cpp.llama_cpp" in sys.modules


def test_report_compares_the_llama_cpp_peer_on_the_gpu(project):
    """With llama.cpp measured on the GPU (flash attention, every layer offloaded), the report compares its
    16-bit and 4-bit figures with each other (the GPU grid's flash-attention points, not the CPU grid's) and with
    transformers' fastest batch-1 figures."""
    r = project / "results"
    bench(r, "gpu-b", "hf-fp16-b1-dynamic-sdpa", "fp16", 1, 40, 20, 25, 5.3)
    bench(r, "gpu-b", "hf-fp16-b1-static-sdpa-compiled-graph", "fp16", 1, 316, 20, 3.2, 5.35, kv_cache="static",
          decode="graph", compile=True)
    bench(r, "gpu-b", "hf-int4-ao-b1-static-sdpa-compiled-graph", "int4-ao", 1, 433, 20, 2.3, 2.2,
          kv_cache="static", decode="graph", compile=True)
    bench(r, "gpu-b", "hf-fp16-b1-static-sdpa-compiled-qkv-graph", "fp16", 1, 343, 20, 2.9, 5.35, kv_cache="static",
          decode="graph", compile=True, compile_mode="reduce-overhead", fuse_qkv=True)
    for quant, fa, tps in (("f16", True, 254), ("f16", False, 247), ("q8_0", True, 297), ("q4_k_m", True, 306),
                           ("q4_0", True, 339)):
        bench(r, "gpu-b", f"gpu-{quant}-t16-b512-fa{int(fa)}-kvf16-generate-p64", None, 1, tps, 10, 3.5, 3.0,
              runtime="llama_cpp", quant=quant, device="cuda", flash_attn=fa, api="generate", kv_type="f16",
              n_threads=16, n_batch=512, n_gpu_layers=-1)
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    assert ("**llama.cpp, 16-bit vs 4-bit speed (every layer on the GPU)**: q4_k_m decodes 306 tokens/s against "
            "f16's 254 tokens/s (1.20× the speed)") in md
    assert ("**transformers' fastest against llama.cpp's, batch 1**: 16-bit 343 tokens/s against llama.cpp's f16 "
            "254 tokens/s (1.35×); 4-bit 433 tokens/s against llama.cpp's q4_0 339 tokens/s (1.28×).") in md
    assert "CUDA-graph loop (default kernels, fused q/k/v) 343 tokens/s per sequence" in md


@pytest.mark.slow
def test_fused_qkv_projection_gives_the_same_tokens_compiled_and_eager(tiny_hf):
    """fuse_qkv: one matmul for q, k and v. The fused model generates the unfused model's tokens (fp32, greedy) with
    generate() and in the compiled fast loop, and torch.compile traces it without a graph break."""
    import torch

    from inferlab.backends.fuse import fuse_qkv

    backend = functools.partial(loaded, tiny_hf)

    ids = [[5, 17, 33, 8, 2, 90, 41, 7]]
    plain, _ = backend(kv_cache="dynamic")
    fused, info = backend(kv_cache="dynamic", fuse_qkv=True)
    layers = plain.model.config.num_hidden_layers
    assert info["fused_qkv_layers"] == layers
    assert type(fused.model.model.layers[0].self_attn.q_proj).__name__ == "FusedQKV"
    assert fused.request(ids, 12).output_ids == plain.request(ids, 12).output_ids
    with torch.no_grad():
        explained = torch._dynamo.explain(fused.model)(torch.tensor(ids))
    assert explained.graph_break_count == 0
    loop, _ = backend(kv_cache="static", decode="fast", compile=True, fuse_qkv=True)
    assert loop.request(ids, 12).output_ids == plain.request(ids, 12).output_ids
    with pytest.raises(ValueError, match="fuse_qkv: .* has no attention module with q_proj, k_proj and v_proj"):
        fuse_qkv(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def gpu_points(extra_points: str) -> dict:
    """The transformers points of the tiny model's GPU grid with these extra points, by name."""
    from inferlab.bench.grid import hf_points

    cfg = compose(["model=tiny-phi", f"bench_gpu.hf.extra_points={extra_points}"])
    return {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 2)}


def test_fused_qkv_points_are_named_grouped_and_refused_with_bitsandbytes():
    names = gpu_points("[{precision: fp16, kv_cache: static, compile: true, decode: graph, fuse_qkv: true}, "
                       "{precision: nf4, kv_cache: static, compile: true, decode: graph, fuse_qkv: true}, "
                       "{precision: fp16, kv_cache: static, compile: true, decode: fast, fuse_qkv: true}, "
                       "{precision: fp16, kv_cache: static, compile: true, decode: fast}]")
    fused = names["hf-fp16-b1-static-sdpa-compiled-qkv-graph"]
    assert fused.settings["fuse_qkv"] is True and fused.skip is None
    assert "fuse_qkv" not in names["hf-fp16-b1-static-sdpa-compiled-fast"].settings  # ids of older points kept
    # a fused model is another load: never in the worker of an unfused one
    fast = "hf-fp16-b1-static-sdpa-compiled-fast"
    assert names[fast.replace("-fast", "-qkv-fast")].group != names[fast].group
    assert "bitsandbytes quantizes the weights while loading" in names["hf-nf4-b1-static-sdpa-compiled-qkv-graph"].skip


@pytest.mark.slow
def test_fused_parallel_block_gives_the_same_tokens_compiled_and_eager(tiny_hf):
    """fuse_block: Phi's parallel layer as two matmuls ([q;k;v;fc1] and [dense|fc2]). The fused model generates the
    unfused model's tokens (fp32, greedy) with generate() and in the compiled fast loop with coordinate-descent
    tuning (the M=1 decomposition), without a graph break; a sequential model is refused by name."""
    import torch

    from inferlab.backends.fuse import fuse_parallel_block

    backend = functools.partial(loaded, tiny_hf)

    ids = [[5, 17, 33, 8, 2, 90, 41, 7]]
    plain, _ = backend(kv_cache="dynamic")
    fused, info = backend(kv_cache="dynamic", fuse_block=True)
    assert info["fused_block_layers"] == plain.model.config.num_hidden_layers
    layer = fused.model.model.layers[0]
    assert [type(m).__name__ for m in (layer.self_attn.q_proj, layer.self_attn.dense, layer.mlp.fc2)] == [
        "BlockInput", "DeferredOutput", "BlockOutput"]
    assert type(fused.model.lm_head).__name__ == "MatVecLinear"
    expected = plain.request(ids, 12).output_ids
    assert fused.request(ids, 12).output_ids == expected
    with torch.no_grad():
        x = torch.tensor(ids)
        assert torch.allclose(fused.model(x).logits, plain.model(x).logits, atol=1e-5)
        assert torch._dynamo.explain(fused.model)(x).graph_break_count == 0
    loop, _ = backend(kv_cache="static", decode="fast", compile=True, fuse_block=True,
                      inductor="coordinate_descent_tuning")
    assert loop.request(ids, 12).output_ids == expected
    llama_like = torch.nn.Module()
    llama_like.layer = torch.nn.Module()
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        setattr(llama_like.layer, name, torch.nn.Module())
    with pytest.raises(ValueError, match="fuse_block: Module has no parallel decoder layer .* use fuse_qkv"):
        fuse_parallel_block(llama_like)


def test_int4_linear_packs_two_weights_per_byte_and_both_paths_compute_the_same():
    """int4-inductor's layer: every weight within half a quantization step of the original, half a byte per weight
    plus a scale and an offset per group of 128, and the one-row reduction (what inductor compiles at batch 1)
    equal to the dequantized matmul that more rows take."""
    import torch

    from inferlab.backends.int4 import group_size_for, int4_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96)
    q = int4_linear(lin)
    assert q.group_size == 128 and q.packed.dtype == torch.uint8 and q.packed.shape == (96, 256)
    assert q.scale.shape == q.offset.shape == (96, 4)
    w = q.dequantize()
    step = q.scale.repeat_interleave(128, dim=1)
    assert torch.all((w - lin.weight).abs() <= step / 2 + 1e-6)
    assert not torch.equal(w, lin.weight)  # it did quantize
    x = torch.randn(1, 1, 512)
    with torch.no_grad():
        one = q(x)
        assert torch.allclose(one, torch.nn.functional.linear(x, w, lin.bias), atol=1e-5)
        rows = q(torch.cat([x, torch.randn(1, 3, 512)], dim=1))
        assert torch.allclose(rows[:, :1], one, atol=1e-5)
    assert (group_size_for(2560), group_size_for(192), group_size_for(100)) == (128, 32, None)
    with pytest.raises(ValueError, match="in_features 100 is not divisible by 64"):
        int4_linear(torch.nn.Linear(100, 8))


@pytest.mark.slow
def test_int4_inductor_model_decodes_fused_or_not_eager_or_compiled(tiny_hf):
    """precision int4-inductor on the tiny model: every projection is quantized (the head stays in 16 bits), the
    block-fused model quantizes to the same values (rows concatenated, groups never straddle the two matrices) and
    generates the same tokens, and the compiled loop with coordinate-descent tuning gets them too."""
    backend = functools.partial(loaded, tiny_hf, "int4-inductor")

    ids = [[5, 17, 33, 8, 2, 90, 41, 7]]
    plain, info = backend(kv_cache="dynamic")
    layers = plain.model.config.num_hidden_layers
    assert info["quantization"].startswith("int4 weight-only, asymmetric, group size 128")
    assert f"{6 * layers} projections quantized, 0 kept" in info["quantization"]
    assert type(plain.model.lm_head).__name__ == "Linear"
    assert info["weight_bytes"] < 0.5 * loaded(tiny_hf, kv_cache="dynamic")[1]["weight_bytes"]
    expected = plain.request(ids, 12).output_ids
    fused, finfo = backend(kv_cache="dynamic", fuse_block=True)
    assert f"{2 * layers} projections quantized" in finfo["quantization"]
    assert fused.request(ids, 12).output_ids == expected
    loop, _ = backend(kv_cache="static", decode="fast", compile=True, fuse_block=True,
                      inductor="coordinate_descent_tuning")
    assert loop.request(ids, 12).output_ids == expected


def test_fused_block_points_are_named_grouped_and_refused_with_bitsandbytes():
    names = gpu_points("[{precision: fp16, kv_cache: static, compile: true, decode: graph, fuse_block: true, "
                       "inductor: coordinate_descent_tuning}, {precision: nf4, kv_cache: static, compile: true, "
                       "decode: graph, fuse_block: true}, {precision: int4-inductor, kv_cache: static, compile: true, "
                       "decode: graph, fuse_block: true, fuse_qkv: true}]")
    fused = names["hf-fp16-b1-static-sdpa-compiled-cdt-block-graph"]
    assert fused.settings["fuse_block"] is True and "fuse_qkv" not in fused.settings and fused.skip is None
    assert "fuse_block" in fused.group
    int4 = names["hf-int4-inductor-b1-static-sdpa-compiled-block-graph"]  # the block includes q/k/v
    assert int4.settings.get("fuse_qkv") is None and int4.skip is None
    assert "fuse_block: bitsandbytes quantizes" in names["hf-nf4-b1-static-sdpa-compiled-block-graph"].skip
    with pytest.raises(ConfigError, match="precision"):
        compose(["model=tiny-phi", "bench_gpu.hf.extra_points=[{precision: int3}]"])


def test_triton_gemv_points_are_named_grouped_and_need_cuda(tiny_hf):
    """gemv: triton: its own name part and worker group, skipped with the reason on a CPU sweep, refused by the
    backend without CUDA (before any compile), an unknown kernel family refused by the config check, and the
    project's GEMV kernels counted as matrix kernels by the profiler."""
    from inferlab.bench.grid import hf_points

    extra = ("[{precision: int4-inductor, kv_cache: static, compile: true, decode: graph, fuse_block: true, "
             "gemv: triton}, {precision: fp16, kv_cache: static, compile: true, decode: fast, gemv: triton}]")
    cfg = compose(["model=tiny-phi", f"bench_gpu.hf.extra_points={extra}", f"bench_cpu.hf.extra_points={extra}"])
    gpu = {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 2)}
    point = gpu["hf-int4-inductor-b1-static-sdpa-compiled-block-triton-graph"]
    assert point.settings["gemv"] == "triton" and point.skip is None and "triton" in point.group
    assert gpu["hf-fp16-b1-static-sdpa-compiled-triton-fast"].group == ("hf", "fp16", "sdpa", "triton")
    cpu = {p.name: p for p in hf_points(cfg.bench_cpu, cfg.model_dir() / "hf", {}, 2)}
    assert "need CUDA" in cpu["hf-fp16-b1-static-sdpa-compiled-triton-fast"].skip
    with pytest.raises(ConfigError, match="extra_points.gemv: 'cublas' is not allowed; choose one of default, triton"):
        compose(["model=tiny-phi", "bench_gpu.hf.extra_points=[{precision: fp16, gemv: cublas}]"])
    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "device": "cpu", "gemv": "triton"})
    with pytest.raises(BackendUnavailable, match="gemv: triton runs Triton kernels, which need CUDA"):
        b.load()
    assert {profile.kind(n) for n in ("gemv_fp16_kernel", "gemv_int4_kernel", "fp16_kernel")} == {"matmul"}
