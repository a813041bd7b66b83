"""The transformers engine serving a static cache and a decode loop, as a recommendation names them."""

from __future__ import annotations

import json
import os
import re
import threading

import httpx
import pytest

from tests.test_serve import hf_server, start_server, stop  # noqa: F401 - hf_server: a fixture


def _batch(pad: int, prompts: list[list[int]]):
    import torch

    w = max(map(len, prompts))
    ids = torch.tensor([[pad] * (w - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_static_cache_steps_give_the_dynamic_caches_logits(tiny_llama_hf):
    """Prompts of three lengths in a static cache of four rows (one unused), stepped on the same tokens: the
    logits of the dynamic cache at every step; a second, narrower batch finds nothing of the first."""
    import torch

    from inferlab.serve.hf_engine import DynamicSteps, HFEngine

    engine = HFEngine(str(tiny_llama_hf), "fp32", "cpu", 4, 4, 0.0,
                      point={"kv_cache": "static", "decode": "graph"}, n_ctx=48)
    assert engine.description["kv_cache"] == "static" and engine.description["decode"] == "graph"
    assert engine.context_window == 48
    for prompts in ([[5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13], [14, 15, 16, 17]], [[30, 31], [40, 41, 42]]):
        ids, mask = _batch(engine.pad, prompts)
        dynamic = DynamicSteps(engine.model, engine.device)
        with torch.inference_mode():
            want, got = dynamic.start(ids, mask), engine.static.start(ids, mask)
            assert got.shape == want.shape == (len(prompts), engine.model.config.vocab_size)
            for _ in range(8):
                assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
                tokens = want.argmax(-1).tolist()
                want, got = dynamic.next(tokens), engine.static.next(tokens)
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_a_request_that_would_overflow_the_static_cache_waits_for_the_next_batch(tiny_llama_hf):
    """A long prompt and a long answer cannot share a 40-position cache (left padding): the second waits for
    the next batch, and each gets all its tokens."""
    from inferlab.serve.engine import GenRequest
    from inferlab.serve.hf_engine import HFEngine

    engine = HFEngine(str(tiny_llama_hf), "fp32", "cpu", 2, 4, 50.0, point={"kv_cache": "static"}, n_ctx=40)
    assert engine.description["decode"] == "generate" and engine.description["cuda_graph"] is False
    done: dict[str, dict] = {}
    ended = threading.Event()

    def emit(name):
        def on(kind, value):
            if kind in ("done", "error"):
                done[name] = {"kind": kind, **(value if isinstance(value, dict) else {"error": value})}
                if len(done) == 2:
                    ended.set()
        return on

    long = GenRequest(prompt_ids=list(range(5, 35)), max_tokens=5, temperature=0.0, ignore_eos=True,
                      emit=emit("long"))
    short = GenRequest(prompt_ids=[5, 6, 7], max_tokens=20, temperature=0.0, ignore_eos=True, emit=emit("short"))
    engine.submit(long)
    engine.submit(short)  # both wait before the engine starts: one batch, were it not for the cache
    assert engine.queue.maxsize == 4  # one whole batch waits, though serve.max_queue (2) is smaller
    engine.start()
    try:
        assert ended.wait(300), done
    finally:
        engine.close()
    assert done["long"]["completion_tokens"] == 5 and done["short"]["completion_tokens"] == 20, done
    assert engine.batch_sizes == {1: 2}, engine.batch_sizes


@pytest.mark.slow
def test_the_server_serves_the_recommended_static_cache_and_compiled_graph_loop(tiny_project, hf_server,  # noqa: F811
                                                                                  tmp_path):
    """A recommendation naming a compiled graph loop over a static cache at batch 4: the server says it serves
    that, and four prompts of other lengths decoded together answer what the dynamic cache answers each alone."""
    from inferlab.environment import environment
    from tests.test_serve import post

    settings = {"runtime": "hf", "device": "cpu", "precision": "fp32", "batch_size": 4, "kv_cache": "static",
                "attn": "sdpa", "compile": True, "decode": "graph"}
    rec = tmp_path / "recommendation.json"
    rec.write_text(json.dumps({"recommendations": [{
        "hardware": environment()["hardware"]["id"], "model": "tiny-phi", "status": "recommended",
        "name": "hf-fp32-b4-static-sdpa-compiled-graph", "reason": "a test's", "settings": settings}]}))
    proc, url = start_server(tiny_project, "serve.source=recommendation", f"serve.recommendation={rec}",
                             "serve.n_ctx=128", "serve.batch_wait_ms=300", "serve.gradio=false")
    try:
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["inferlab"]
        assert served["kv_cache"] == "static" and served["decode"] == "graph" and served["compile"] is True
        assert served["max_batch"] == 4 and served["context_window"] == 128, served
        prompts = ["The weather today is", "A short story about a cat who", "def add(a, b):", "Paris"]
        body = {"model": "tiny-phi", "max_tokens": 12, "temperature": 0}
        alone = [post(hf_server, "/v1/completions", {**body, "prompt": p}, headers={}).json()["choices"][0]["text"]
                 for p in prompts]
        out: dict[int, dict] = {}

        def call(i):
            out[i] = post(url, "/v1/completions", {**body, "prompt": prompts[i]}, headers={}).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [out[i]["choices"][0]["text"] for i in range(4)] == alone, (out, alone)
        sizes = {int(m.group(1)) for m in re.finditer(r'inferlab_engine_batches_total\{size="(\d+)"\}',
                                                      httpx.get(f"{url}/metrics").text)}
        assert max(sizes) >= 2, sizes  # decoded together
        too_long = post(url, "/v1/completions", {**body, "prompt": "word " * 200}, headers={})
        assert too_long.status_code == 400 and "128" in too_long.text, too_long.text
    finally:
        stop(proc)


@pytest.mark.slow
def test_serve_bench_serves_the_recommendation_whole_and_records_what_was_served(tiny_project, tmp_path):
    """serve_bench's server serves the recommended batch size, KV cache and decode loop (not only its runtime and
    precision), and every record says what the server said it served."""
    import subprocess
    import sys

    from inferlab import records
    from inferlab.environment import environment

    settings = {"runtime": "hf", "device": "cpu", "precision": "fp32", "batch_size": 2, "kv_cache": "static",
                "attn": "sdpa", "compile": False, "decode": "graph"}
    rec = tmp_path / "recommendation.json"
    rec.write_text(json.dumps({"recommendations": [{
        "hardware": environment()["hardware"]["id"], "model": "tiny-phi", "status": "recommended",
        "name": "hf-fp32-b2-static-sdpa-graph", "reason": "a test's", "settings": settings}]}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "stages/serve_bench.py", "model=tiny-phi", "tracking.enabled=false",
                    f"serve.recommendation={rec}", "serve.n_ctx=256", f"paths.results={tmp_path / 'results'}",
                    f"paths.metrics={tmp_path / 'metrics'}", "serve_bench.concurrency=[2]", "serve_bench.requests=2",
                    "serve_bench.max_tokens=6", "serve_bench.warmup=0", "serve_bench.rate_fractions=[1.0]",
                    "serve_bench.rate_requests=2"],
                   cwd=tiny_project, env={**env, "INFERLAB_ROOT": str(tiny_project)}, check=True)
    served = records.read_all((tmp_path / "results" / "serve_bench").glob("*.jsonl"))
    assert len(served) == 2 and all(r.status == "ok" for r in served), [(r.name, r.reason) for r in served]
    for r in served:
        assert r.point["settings"] == settings
        said = r.metrics["served"]
        assert (said["kv_cache"], said["decode"], said["max_batch"], said["context_window"]) == \
            ("static", "graph", 2, 256), said
    (hw,) = json.loads((tmp_path / "metrics" / "serve_bench.json").read_text()).values()
    assert list(hw["models"]["tiny-phi"]["saturation"]) == ["hf fp32 b2 graph loop"]
