"""The CPU benchmark on the tiny model: fixed-length generation, the prompt cache really hit, memory isolation
between points, failure recording, resume after interruption, and the same record from Hydra and DVC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from inferlab import records
from inferlab.backends import get_backend
from inferlab.bench import registry, scenarios
from inferlab.sweep.worker import Worker

from .conftest import BIN, ROOT, run

PROMPTS = ROOT / "data" / "prompts"
FAST = ["bench_cpu.workload.new_tokens=8", "bench_cpu.workload.repetitions=2", "bench_cpu.workload.warmup=1",
        "bench_cpu.hf.new_tokens=4"]


def llama(tiny_project, quant="q4_0", **kw):
    b = get_backend("llama_cpp")({"model_path": str(tiny_project / "models/tiny-phi/gguf" / f"tiny-phi-{quant}.gguf"),
                                  "n_threads": 2, **kw})
    b.load()
    return b


@pytest.mark.parametrize("api", ["generate", "completion", "completion_stream"])
def test_llama_generates_exactly_the_fixed_length(tiny_project, api):
    b = llama(tiny_project)
    try:
        ids = b.tokenize("The river carries sand and stones")
        for n in (1, 7, 40):
            t = b.request([ids], n, api=api)
            assert t.generated_tokens == n
            if api != "completion":
                assert len(t.token_times) == n
    finally:
        b.unload()


def test_completion_api_holds_the_length_when_text_ends_inside_a_character(tiny_project):
    """llama-cpp-python's completion API skips its max_tokens check while the text ends inside a multi-byte UTF-8
    character (the 129-of-128 tokens of the quick start): forced to emit a lone lead byte at every step, it runs
    on until the context is full. The project's stopping criterion holds it to the length asked for."""
    from inferlab.backends.llama_cpp import exact_length

    b = llama(tiny_project, n_ctx=64)
    try:
        lead = next(i for i in range(b.llm.n_vocab()) if len(t := b.llm.detokenize([i])) == 1 and t[0] >= 0xE0)
        ids = b.tokenize("The river carries sand and stones")
        kw = dict(max_tokens=8, temperature=0.0, logit_bias={lead: 100.0})
        with pytest.raises(RuntimeError, match="llama_decode"):  # the bug: past max_tokens to the end of n_ctx
            b.llm.create_completion(ids, **kw)
        assert b.llm.create_completion(ids, stopping_criteria=exact_length(len(ids), 8), **kw)[
            "usage"]["completion_tokens"] == 8
        chunks = [c for c in b.llm.create_completion(ids, stream=True, stopping_criteria=exact_length(len(ids), 8),
                                                      **kw) if c["choices"][0]["finish_reason"] is None]
        assert len(chunks) == 8
    finally:
        b.unload()


def test_transformers_generates_exactly_the_fixed_length(tiny_hf):
    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "dynamic", "threads": 2})
    b.load()
    ids = b.tokenize("The library opened at nine in the morning")
    for batch, n in ((1, 25), (3, 9)):
        t = b.request([ids] * batch, n)
        assert t.generated_tokens == n and len(t.token_times) == n and t.batch == batch
    b.settings["kv_cache"] = "none"
    assert b.request([ids], 5).generated_tokens == 5


def test_prompt_cache_is_really_hit(tiny_project):
    """Hits are checked by llama.cpp's counter of evaluated prompt tokens, not assumed."""
    results = {}
    for mode in ("none", "ram", "disk", "context"):
        b = llama(tiny_project, "q8_0", scenario="prefix_cache", mode=mode,
                  cache_dir=str(tiny_project / f"cache-{mode}"))
        try:
            results[mode], _ = scenarios.prefix_cache(b, PROMPTS, mode, 256, 12, 3, 4)
        finally:
            b.unload()
    assert results["none"]["cache_hits"] == 0
    assert results["none"]["prompt_tokens_evaluated"]["median"] == 256 + 12
    for mode in ("ram", "disk", "context"):
        assert results[mode]["cache_hits"] == 3, mode
        assert results[mode]["prompt_tokens_evaluated"]["max"] <= 13, mode  # only the suffix is evaluated


def test_latency_scenario_keeps_cold_request_apart(tiny_project):
    b = llama(tiny_project)
    try:
        m, s = scenarios.latency(b, PROMPTS, 32, 12, 1, warmup=1, repetitions=3)
    finally:
        b.unload()
    assert len(s["ttft_ms"]) == 3 and len(s["itl_ms"]) == 3 * 11  # warm-up and cold request excluded
    assert m["ttft_ms"]["n"] == 3 and "cold" in m and m["cold"]["ttft_ms"] > 0
    assert m["llama_decode_tps"]["median"] > 0 and m["harness_overhead_ms"]["n"] == 3


def test_peak_memory_does_not_carry_over_between_points(tiny_project):
    """One worker runs a point with a large KV cache, then a small one: the second point's peak is its own."""
    path = str(tiny_project / "models/tiny-phi/gguf/tiny-phi-q4_0.gguf")
    common = {"scenario": "latency", "prompt_tokens": 16, "new_tokens": 4, "warmup": 0, "repetitions": 1,
              "n_threads": 2, "kv_type": "f32"}
    w = Worker("llama_cpp", {"model_path": path}, measure=registry.run)
    try:
        big = w.run({**common, "n_ctx": 131072}, "big", str(PROMPTS), 120)  # f32 KV: 2*2*256*131072*4 B = 512 MiB
        small = w.run({**common, "n_ctx": 512}, "small", str(PROMPTS), 120)
    finally:
        w.stop()
    fresh = Worker("llama_cpp", {"model_path": path}, measure=registry.run)
    try:
        alone = fresh.run({**common, "n_ctx": 512}, "small", str(PROMPTS), 120)
    finally:
        fresh.stop()
    assert big[0] == small[0] == alone[0] == "ok", (big, small, alone)
    big_peak, small_peak = big[1]["metrics"]["peak_rss_mib"], small[1]["metrics"]["peak_rss_mib"]
    assert big_peak > small_peak + 300
    assert abs(small_peak - alone[1]["metrics"]["peak_rss_mib"]) < 100


def stage_env(project):
    return {"INFERLAB_ROOT": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def read_records(project):
    return records.read_all(sorted((project / "results" / "bench_cpu").glob("*.jsonl")))


def test_failed_points_are_recorded_and_the_sweep_goes_on(tiny_project):
    args = [sys.executable, "stages/bench_cpu.py", "model=tiny-phi", "runtime=llama_cpp", "quant=q4_0",
            "bench_cpu.prompt_cache.enabled=false", *FAST]
    before = len(read_records(tiny_project))
    run([*args], cwd=tiny_project, env={**stage_env(tiny_project), "INFERLAB_INJECT_FAILURE": "q4_0-t1-:crash"})
    new = read_records(tiny_project)[before:]
    by_name = {r.name.split("-")[1]: r for r in new}
    assert by_name["t1"].status == "failed" and "SIGSEGV" in by_name["t1"].reason
    assert by_name["t2"].status == "ok"  # the next point ran in a fresh worker
    run([*args], cwd=tiny_project, env={**stage_env(tiny_project), "INFERLAB_INJECT_FAILURE": "q4_0-t2-:error"})
    r = [x for x in read_records(tiny_project) if x.name.startswith("q4_0-t2-")][-1]
    assert r.status == "failed" and "injected failure" in r.reason
    metrics = json.loads((tiny_project / "metrics" / "bench_cpu.json").read_text())
    points = next(iter(metrics.values()))["models"]["tiny-phi"]["points"]
    assert points[r.name]["status"] == "failed" and "injected" in points[r.name]["reason"]


def test_interrupted_sweep_resumes_without_redoing_finished_points(tiny_project):
    args = [sys.executable, "stages/bench_cpu.py", "model=tiny-phi", "runtime=llama_cpp",
            "bench_cpu.prompt_cache.enabled=false", "bench_cpu.llama_cpp.extra_points=[]",
            "bench_cpu.llama_cpp.quants=[f16,q8_0,q5_k_m,q4_k_m,q4_0]",
            "bench_cpu.workload.new_tokens=48", "bench_cpu.workload.repetitions=3", "bench_cpu.workload.warmup=1"]
    path = tiny_project / "results" / "bench_cpu"
    before = {r.record_id for r in read_records(tiny_project)}
    env = {**os.environ, **stage_env(tiny_project), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "INFERLAB_INJECT_FAILURE": "q4_0-t2-:hang"}  # the last point hangs: the sweep is killed there
    proc = subprocess.Popen(args, cwd=tiny_project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        new = [r for r in read_records(tiny_project) if r.record_id not in before]
        if len(new) >= 9:  # 5 quants x 2 threads: all but the hanging one
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, workers included, mid-point
    proc.wait()
    first = [r for r in read_records(tiny_project) if r.record_id not in before]
    assert len(first) == 9 and len({r.sweep_id for r in first}) == 1
    for f in path.glob("*.jsonl"):  # every line whole
        for line in f.read_text().splitlines():
            json.loads(line)
    r = run(args, cwd=tiny_project, env=stage_env(tiny_project))
    assert "resuming interrupted sweep" in r.stdout + r.stderr
    new = [x for x in read_records(tiny_project) if x.record_id not in before]
    assert len(new) == 10 and {x.sweep_id for x in new} == {first[0].sweep_id}
    assert [x.name for x in new[9:]] == ["q4_0-t2-b512-fa0-kvf16-generate-p64"]
    assert len({x.point_id for x in new}) == 10  # nothing ran twice
    # a finished sweep is not resumed: the same command measures every point again
    r = run(args, cwd=tiny_project, env=stage_env(tiny_project))
    assert "resuming" not in r.stdout + r.stderr
    assert len([x for x in read_records(tiny_project) if x.record_id not in before]) == 20


def test_grid_pins_and_skips(tiny_project, monkeypatch):
    from inferlab.bench.grid import default_threads, hf_points, llama_points
    from inferlab.config import compose

    monkeypatch.setenv("INFERLAB_ROOT", str(tiny_project))
    assert default_threads(2) == [1, 2] and default_threads(6) == [1, 2, 4, 6]
    assert default_threads(16) == [1, 2, 4, 8, 16]
    cfg = compose(["model=tiny-phi", "quant=q8_0", "n_threads=1"])
    pts = llama_points(cfg, cfg.pins(), 2)
    assert {p.settings["quant"] for p in pts} == {"q8_0"} and {p.settings["n_threads"] for p in pts} == {1}
    assert not hf_points(cfg.bench_cpu, tiny_project, cfg.pins(), 2)  # a llama.cpp pin selects no transformers point
    cfg = compose(["model=tiny-phi", "quant=q6_k", "runtime=llama_cpp"])  # no such GGUF file: skipped, not failed
    (p,) = llama_points(cfg, cfg.pins(), 1)
    assert p.skip and "convert.quants" in p.skip
    cfg = compose(["model=tiny-phi"])
    names = {p.name: p for p in llama_points(cfg, cfg.pins(), 2)}
    assert "flash attention" in names["q4_k_m-t2-b512-fa0-kvq8_0-generate-p64"].skip
    hf = {p.name: p for p in hf_points(cfg.bench_cpu, tiny_project, {"precision": "bf16", "kv_cache": "dynamic"}, 2)}
    assert set(hf) == {f"hf-bf16-b{b}-dynamic-sdpa" for b in (1, 2, 4, 8)}
