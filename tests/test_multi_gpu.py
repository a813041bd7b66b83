"""Sweeps across the GPUs of one host, on this CPU machine: GPUs faked by environment ($INFERLAB_GPUS), claimed by
real processes through real locks, the launcher composed and run, the parallel-vs-alone check on records."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest

from inferlab import records as rec
from inferlab.bench.parallel import compare

from .conftest import run


def _claim(out: str, hold: float, barrier) -> None:
    from inferlab.bench.lock import claim_gpu

    barrier.wait()
    t0 = time.time()
    with claim_gpu() as gpu:
        got = time.time()
        env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE",
                                               "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}
        time.sleep(hold)
    Path(out).write_text(json.dumps({"gpu": gpu, "waited": got - t0, "env": env,
                                     "after": os.environ.get("CUDA_VISIBLE_DEVICES")}))


def test_each_job_claims_its_own_gpu_and_the_third_waits(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERLAB_GPUS", "0,1")
    monkeypatch.setenv("INFERLAB_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_claim, args=(str(o), 1.5, barrier)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = [json.loads(o.read_text()) for o in outs]
    assert {g["gpu"] for g in got} == {"0", "1"}
    for g in got:  # the workers of a job see only its GPU, and NVLink multicast stays off
        assert g["env"] == {"CUDA_VISIBLE_DEVICES": g["gpu"], "NCCL_NVLS_ENABLE": "0",
                            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
        assert g["after"] is None  # restored when the job ends
    waits = sorted(g["waited"] for g in got)
    assert waits[0] < 0.5 and waits[1] < 0.5 and waits[2] > 1.0  # two at once, the third when one was free


def test_one_gpu_or_none_claims_nothing(monkeypatch):
    from inferlab.bench.lock import claim_gpu

    monkeypatch.setenv("INFERLAB_GPUS", "0")
    with claim_gpu() as gpu:
        assert gpu is None


@pytest.mark.slow
def test_the_gpus_launcher_runs_jobs_that_claim_gpus(project, tmp_path):
    env = {**os.environ, "INFERLAB_ROOT": str(project), "INFERLAB_GPUS": "0,1", "INFERLAB_LOCK_DIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run([sys.executable, "stages/download.py", "model=tiny-phi", "tracking.enabled=false"], cwd=project, env=env)
    r = run([sys.executable, "stages/bench_gpu.py", "-m", "hydra/launcher=gpus", "model=tiny-phi", "runtime=hf",
             "precision=fp16,bf16", "batch_size=1", "kv_cache=dynamic", "bench_gpu.prefix_cache.enabled=false",
             "bench_gpu.streaming.enabled=false", "bench_gpu.assisted.enabled=false", "tracking.enabled=false"],
            cwd=project, env=env)
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    recs = rec.read_all((project / "results" / "bench_gpu").glob("*.jsonl"))
    assert sorted(x.point["precision"] for x in recs) == ["bf16", "fp16"]
    for x in recs:  # no CUDA here: skipped, but each job claimed a GPU and says which
        assert x.status == "skipped" and x.environment["gpu"]["claimed"] in ("0", "1")
        assert x.environment["gpu"]["of"] == ["0", "1"]


def _record(name: str, tps: float, busy: list[str], gpu: str = "gpu-0") -> rec.Record:
    return rec.Record(stage="bench_gpu", name=name, point={"precision": name}, config={},
                      model={"name": "m", "weights": "random"},
                      environment={"hardware": {"id": "h200"}, "git": {}, "libraries": {}},
                      metrics={"decode_tps": {"median": tps}, "total_tps": {"median": tps},
                               "device_lock": {"device": gpu, "waited_s": 0.0, "others_busy": busy}})


def test_parallel_check_compares_each_point_with_itself_alone(tmp_path):
    path = tmp_path / "results" / "bench_gpu" / "h200.jsonl"
    rec.append(path, _record("fp16", 100.0, []))
    rec.append(path, _record("fp16", 103.0, ["gpu-1"]))  # +3 %: same figures
    rec.append(path, _record("nf4", 50.0, [], "gpu-1"))
    rec.append(path, _record("nf4", 44.0, ["gpu-0"], "gpu-1"))  # -12 %: disturbed
    rec.append(path, _record("int8", 20.0, []))  # never measured beside another: not compared
    rows = {r["name"]: r for r in compare(tmp_path / "results", "bench_gpu", 0.05)}
    assert set(rows) == {"fp16", "nf4"}
    assert rows["fp16"]["within_tolerance"] and rows["fp16"]["decode_tps_ratio"] == pytest.approx(1.03)
    assert not rows["nf4"]["within_tolerance"] and rows["nf4"]["beside"] == "gpu-0"
