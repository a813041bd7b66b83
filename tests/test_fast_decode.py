"""The fast decode loop (static cache, one step function, no host sync per token) computes what generate() does."""

from __future__ import annotations

from inferlab.backends.hf import HFBackend
from inferlab.bench.grid import hf_points
from inferlab.config import compose


def test_fast_and_graph_loops_match_generate_token_for_token(tiny_hf):
    base = {"model_dir": str(tiny_hf), "precision": "fp32", "device": "cpu", "attn": "sdpa", "threads": 2}
    plain = HFBackend({**base, "kv_cache": "dynamic"})
    plain.load()
    ids = plain.tokenize("The weather today is nice and the")
    prompts = [ids, ids[::-1]]  # a batch of two, equal length
    want = plain.request(prompts, 12)
    for decode in ("fast", "graph"):
        loop = HFBackend({**base, "kv_cache": "static", "decode": decode})
        loop.load()
        for _ in range(2):  # the second request reuses (resets) the static cache and the step's buffers
            got = loop.request(prompts, 12)
            assert got.output_ids == want.output_ids, decode
            assert got.generated_tokens == 12 and len(got.token_times) == 12 and got.batch == 2
            assert got.start < got.token_times[0] <= got.token_times[-1] <= got.end


def test_fast_and_compile_mode_points_in_the_grid():
    cfg = compose(["bench_gpu=fast", "model=phi-2-random"])
    points = {p.name: p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16)}
    fast = points["hf-fp16-b1-static-sdpa-compiled-fast"]
    assert fast.settings["decode"] == "fast" and fast.settings["compile_mode"] == "reduce-overhead"
    assert points["hf-fp16-b1-static-sdpa-compiled-max-autotune-fast"].settings["compile_mode"] == "max-autotune"
    assert "decode" not in points["hf-fp16-b1-static-sdpa-compiled"].settings  # generate() points keep their ids
    cfg = compose(["bench_gpu=fast", "model=phi-2-random", "bench_gpu.hf.extra_points=[{decode: fast}]"])
    (p,) = [p for p in hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16) if p.name.endswith("-fast")]
    assert p.skip == "the fast decode loop runs on a static KV cache (kv_cache=static)"
