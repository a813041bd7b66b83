"""The GPU sweep's logic on CPU: skip recording without CUDA, the grid and its time-saving grouping, prefix
caching with a copied KV cache, streaming, and out-of-memory handling through an injected failure."""

from __future__ import annotations

import json
import sys

import pytest

from inferlab import records
from inferlab.backends import get_backend
from inferlab.bench import hf_scenarios
from inferlab.config import ConfigError, compose

from .conftest import ROOT, run

PROMPTS = ROOT / "data" / "prompts"


def env(project):
    return {"INFERLAB_ROOT": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def test_without_cuda_every_point_is_recorded_as_skipped(tiny_project):
    run([sys.executable, "stages/bench_gpu.py", "model=tiny-phi"], cwd=tiny_project, env=env(tiny_project))
    recs = records.read_all((tiny_project / "results" / "bench_gpu").glob("*.jsonl"))
    cfg = compose(["model=tiny-phi"])
    expected = len(cfg.bench_gpu.hf.precisions) * len(cfg.bench_gpu.hf.batch_sizes) + len(
        cfg.bench_gpu.hf.extra_points) + len(cfg.bench_gpu.prefix_cache.modes) + 1
    L = cfg.bench_gpu.llama_cpp
    expected += len(L.quants) * len(L.flash_attn) * len(L.n_batch) * len(L.kv_type) + len(L.extra_points)
    expected += len(cfg.bench_gpu.assisted.lookup_tokens)
    assert len(recs) == expected
    assert {r.point["runtime"] for r in recs} == {"hf", "llama_cpp"}
    assert {r.point["scenario"] for r in recs} >= {"latency", "prefix_cache", "streaming", "assisted"}
    assert all(r.status == "skipped" and "no CUDA device" in r.reason for r in recs)
    metrics = json.loads((tiny_project / "metrics" / "bench_gpu.json").read_text())
    (hw,) = metrics.values()
    assert all(p["status"] == "skipped" for p in hw["models"]["tiny-phi"]["points"].values())


def test_gpu_grid_groups_points_by_loaded_model():
    from inferlab.bench.grid import hf_points

    cfg = compose(["model=phi-2-random"])
    pts = hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", {}, 16)
    names = {p.name for p in pts}
    assert {"hf-fp16-b1-dynamic-sdpa", "hf-fp16-b64-dynamic-sdpa", "hf-nf4-b16-dynamic-sdpa",
            "hf-int8-b1-dynamic-sdpa", "hf-fp16-b1-static-sdpa-compiled", "hf-fp16-b1-none-sdpa"} <= names
    full = compose(["model=phi-2-random", "bench_gpu=full"])
    full_pts = hf_points(full.bench_gpu, full.model_dir() / "hf", {}, 16)
    assert len(full_pts) >= 7 * 7 and "hf-fp16-b1-dynamic-eager" in {p.name for p in full_pts}
    # one worker (one model load) per precision and attention implementation
    for grid in (pts, full_pts):
        assert len({p.group for p in grid}) == len({(p.settings["precision"], p.settings["attn"]) for p in grid})
    pinned = compose(["model=phi-2-random", "precision=nf4", "batch_size=4"])
    assert [p.name for p in hf_points(pinned.bench_gpu, pinned.model_dir() / "hf", pinned.pins(), 16)] == [
        "hf-nf4-b4-dynamic-sdpa"]


def test_bad_gpu_config_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"bench_gpu.hf.precisions: 'int4' is not allowed.*nf4"):
        compose(["bench_gpu.hf.precisions=[int4]"])
    with pytest.raises(ConfigError, match="bench_gpu: 'huge' is not a known bench_gpu; choose one of answer, best, "
                                          "default, fast, full"):
        compose(["bench_gpu=huge"])


@pytest.fixture(scope="module")
def hf_cpu(tiny_project):
    b = get_backend("hf")({"model_dir": str(tiny_project / "models/tiny-phi/hf"), "precision": "fp32",
                           "kv_cache": "dynamic", "threads": 2})
    b.load()
    yield b
    b.unload()


def test_prefix_cache_reuse_is_hit_and_gives_the_same_tokens(hf_cpu):
    reuse, _ = hf_scenarios.prefix_cache(hf_cpu, PROMPTS, "reuse", 200, 10, 3, 6)
    recompute, _ = hf_scenarios.prefix_cache(hf_cpu, PROMPTS, "recompute", 200, 10, 3, 6)
    assert reuse["cache_hits"] == 3 and reuse["prompt_tokens_evaluated"]["max"] <= 10
    assert recompute["cache_hits"] == 0 and recompute["prompt_tokens_evaluated"]["median"] == 210
    assert reuse["prefix_fill_ms"] > 0 and reuse["cache_copy_ms"] > 0


def test_copied_prefix_cache_generates_what_recomputing_generates(hf_cpu):
    import copy

    import torch
    from transformers import DynamicCache

    from inferlab.bench.workload import shared_prefix_requests

    prefix, (suffix,) = shared_prefix_requests(hf_cpu.tokenize, PROMPTS, 120, 8, 1)
    cache = DynamicCache(config=hf_cpu.model.config)
    with torch.inference_mode():
        hf_cpu.model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    with_cache = hf_cpu.request([prefix + suffix], 12, past_key_values=copy.deepcopy(cache)).output_ids
    without = hf_cpu.request([prefix + suffix], 12).output_ids
    assert with_cache == without
    again = hf_cpu.request([prefix + suffix], 12, past_key_values=copy.deepcopy(cache)).output_ids
    assert again == without  # the shared cache was not extended by the first request


def test_streaming_as_the_consumer_sees_it(hf_cpu):
    m, s = hf_scenarios.streaming(hf_cpu, PROMPTS, 32, 16, 1, warmup=1, repetitions=2)
    assert len(s["ttft_ms"]) == 2 and m["text_pieces"]["min"] >= 1
    assert all(t <= e for t, e in zip(s["ttft_ms"], s["stream_e2e_ms"]))
    assert m["streaming_overhead_ms"]["n"] == 2


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tiny_project):
    """An OOM (injected: there is no GPU here) fails its point with the reason; the next point runs in a fresh
    worker (on a GPU: a clean device)."""
    args = [sys.executable, "stages/bench_cpu.py", "model=tiny-phi", "runtime=hf", "precision=fp32",
            "bench_cpu.hf.batch_sizes=[1,2]", "bench_cpu.hf.extra_points=[]", "bench_cpu.hf.new_tokens=4",
            "bench_cpu.workload.repetitions=1", "bench_cpu.workload.warmup=0"]
    before = {r.record_id for r in records.read_all((tiny_project / "results" / "bench_cpu").glob("*.jsonl"))}
    run(args, cwd=tiny_project, env={**env(tiny_project), "INFERLAB_INJECT_FAILURE": "hf-fp32-b1-:oom"})
    new = [r for r in records.read_all((tiny_project / "results" / "bench_cpu").glob("*.jsonl"))
           if r.record_id not in before]
    by = {r.name: r for r in new}
    assert by["hf-fp32-b1-dynamic-sdpa"].status == "failed"
    assert by["hf-fp32-b1-dynamic-sdpa"].reason.startswith("out of memory")
    assert by["hf-fp32-b2-dynamic-sdpa"].status == "ok"
