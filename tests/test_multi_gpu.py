"""Sweeps across the GPUs of one host, on this CPU machine: GPUs faked by environment ($INFERLAB_GPUS) or by the
list a sweep is given, claimed by real processes through real locks; points measured by real llama.cpp workers
pinned to their GPU's share of this machine's cores; the launcher composed and run; the parallel-vs-alone check on
records in a configured results folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferlab import NO_MULTICAST
from inferlab import records as rec
from inferlab.bench import registry
from inferlab.bench.parallel import compare
from inferlab.sweep import placement

from .conftest import run


def _claim(out: str, hold: float, barrier) -> None:
    from inferlab.sweep.locks import claim_gpu

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
    from inferlab.sweep.locks import claim_gpu

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


# `nvidia-smi topo -m` as the driver prints it (header underlined, tab-separated, the GPU NUMA ID after a double tab)
TOPO_X2 = ("\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
           "GPU0\t X \tNV18\t0-31\t0\t\tN/A\n"
           "GPU1\tNV18\t X \t0-31\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n  NV#  = Connection traversing a bonded "
           "set of # NVLinks\n")
TOPO_TWO_NODES = ("\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
                  "GPU0\t X \tNV12\tSYS\tSYS\tPIX\t0-15,32-47\t0\t\tN/A\n"
                  "GPU1\tNV12\t X \tSYS\tSYS\tPIX\t0-15,32-47\t0\t\tN/A\n"
                  "GPU2\tSYS\tSYS\t X \tNV12\tSYS\t16-31,48-63\t1\t\tN/A\n"
                  "GPU3\tSYS\tSYS\tNV12\t X \tSYS\t16-31,48-63\t1\t\tN/A\n"
                  "NIC0\tPIX\tPIX\tSYS\tSYS\t X \n\nLegend:\n\n  SYS  = ...\n\nNIC Legend:\n\n  NIC0: mlx5_0\n")


def _fake_sysfs(root: Path, cpus: int, ht_offset: int | None = None) -> Path:
    """A sysfs tree with `cpus` logical cores; with ht_offset, core c and c + ht_offset are siblings."""
    for c in range(cpus):
        sib = sorted({c, c + ht_offset if c < ht_offset else c - ht_offset}) if ht_offset else [c]
        d = root / "devices" / "system" / "cpu" / f"cpu{c}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(",".join(map(str, sib)) + "\n")
    return root


def test_each_gpu_gets_its_numa_nodes_cores_and_gpus_of_one_node_split_them(tmp_path):
    assert placement.parse_topo(TOPO_X2) == {"0": {"cpus": list(range(32)), "numa": "0"},
                                             "1": {"cpus": list(range(32)), "numa": "0"}}
    two = placement.parse_topo(TOPO_TWO_NODES)
    assert set(two) == {"0", "1", "2", "3"} and two["2"]["numa"] == "1"
    assert two["3"]["cpus"] == [*range(16, 32), *range(48, 64)]
    root = _fake_sysfs(tmp_path / "sys", 64, ht_offset=32)
    slots = placement.cpu_shares(["0", "1", "2", "3"], two, list(range(64)), "nvidia-smi topo -m", root)
    # two GPUs per node: each half of its node's physical cores, with their hyperthread siblings
    assert placement.format_cpulist(slots["0"].cpus) == "0-7,32-39"
    assert placement.format_cpulist(slots["1"].cpus) == "8-15,40-47"
    assert placement.format_cpulist(slots["3"].cpus) == "24-31,56-63"
    assert slots["2"].numa == "1" and slots["2"].source == "nvidia-smi topo -m"
    # the x2 host: one node of 32 cores for both GPUs; this process may use only 0-23
    x2 = placement.cpu_shares(["0", "1"], placement.parse_topo(TOPO_X2), list(range(24)), "nvidia-smi topo -m",
                              _fake_sysfs(tmp_path / "sys32", 32))
    assert [placement.format_cpulist(x2[g].cpus) for g in "01"] == ["0-11", "12-23"]
    env = x2["1"].env()  # what its workers start with
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert {env[k] for k in placement.THREAD_ENV} == {"12"} and all(env[k] == v for k, v in NO_MULTICAST.items())


def test_without_topology_sysfs_then_an_even_split(tmp_path):
    dev = tmp_path / "sys" / "bus" / "pci" / "devices"
    for bus, cpus, node in (("0000:18:00.0", "0-3", "0"), ("0000:3b:00.0", "4-7", "1")):
        (dev / bus).mkdir(parents=True)
        (dev / bus / "local_cpulist").write_text(cpus + "\n")
        (dev / bus / "numa_node").write_text(node + "\n")
    found = placement.sysfs_affinity({"0": "00000000:18:00.0", "1": "00000000:3B:00.0"}, tmp_path / "sys")
    assert found == {"0": {"cpus": [0, 1, 2, 3], "numa": "0"}, "1": {"cpus": [4, 5, 6, 7], "numa": "1"}}
    root = _fake_sysfs(tmp_path / "sys", 8)
    slots = placement.cpu_shares(["0", "1"], found, list(range(8)), "sysfs local_cpulist", root)
    assert [placement.format_cpulist(slots[g].cpus) for g in "01"] == ["0-3", "4-7"]
    # nothing known (or a GPU left without cores): an even split of the usable cores
    even = placement.cpu_shares(["0", "1", "2"], {}, list(range(6)), "", root)
    assert [placement.format_cpulist(even[g].cpus) for g in "012"] == ["0-1", "2-3", "4-5"]
    assert even["0"].source == "even split of the usable cores"
    assert placement.cpu_shares(["0", "1"], {"0": {"cpus": [0]}, "1": {"cpus": [0]}}, [0, 1], "x", root)["1"].cpus \
        == (1,)


def _pinned(out: str, cpus: list[int]) -> None:
    placement.apply(cpus, "hf")
    Path(out).write_text(json.dumps(placement.observed()))


def test_a_pinned_hf_worker_runs_on_its_cores_with_torch_threads_to_match(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[-1:]
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_pinned, args=(str(tmp_path / "o.json"), cpus))
    proc.start()
    proc.join(120)
    got = json.loads((tmp_path / "o.json").read_text())
    assert got["cpus"] == str(cpus[0]) and got["torch_threads"] == 1 and got["torch_interop_threads"] == 1


def test_a_process_started_with_its_own_environment_keeps_multicast_off(tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path)}  # none of the three variables
    code = "import os, json, inferlab; print(json.dumps({k: os.environ.get(k) for k in inferlab.NO_MULTICAST}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == NO_MULTICAST


def _llama_point(cfg, name: str, quant: str, new_tokens: int):
    from inferlab.sweep.points import Point

    settings = {"quant": quant, "n_threads": 1, "n_batch": 64, "flash_attn": False, "kv_type": "f16",
                "api": "generate", "prompt_tokens": 16, "scenario": "latency", "new_tokens": new_tokens,
                "warmup": 0, "repetitions": 3, "n_ctx": 128, "n_gpu_layers": 0}
    return Point(name, "llama_cpp", ("llama_cpp", quant), settings, {"model_path": str(cfg.gguf_path(quant))})


def test_points_go_to_whichever_gpu_is_free_on_workers_pinned_to_its_cores(tiny_project, tmp_path, monkeypatch):
    """Two fake GPUs, each with one of this machine's cores. A slow point holds one GPU; the other runs every other
    point meanwhile, including the one left of the slow point's model (not one pre-assigned list per GPU). Each
    worker read back its cores and environment; each point is recorded once, beside the other GPU."""
    from inferlab.config import compose, resolve
    from inferlab.stage import StageRun
    from inferlab.sweep.run import run_sweep
    from inferlab.sweep.worker import FAIL_ENV

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable cores: one for each fake GPU")
    monkeypatch.setenv("INFERLAB_ROOT", str(tiny_project))
    monkeypatch.setenv("INFERLAB_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv(FAIL_ENV, "slow-a:slow=6")
    cfg = compose(["model=tiny-phi", f"paths.results={tmp_path / 'results'}", f"paths.metrics={tmp_path / 'm'}",
                   "tracking.enabled=false"])
    stage = StageRun(cfg, "bench_gpu", sections=("bench_gpu",))
    slots = list(placement.host_slots(["0", "1"]).values())  # no nvidia-smi here: an even split of the cores
    points = [_llama_point(cfg, "slow-a", "q8_0", 4), _llama_point(cfg, "a1", "q8_0", 5),
              *(_llama_point(cfg, f"b{i}", "q4_0", 4 + i) for i in range(3))]
    run_sweep(stage, points, resolve(cfg.bench_cpu.workload.prompts), {}, 120, False, [], lambda m: None, slots,
              measure=registry.run)
    recs = list(rec.read(stage.path))
    assert sorted(r.name for r in recs) == ["a1", "b0", "b1", "b2", "slow-a"]  # each once
    by = {r.name: r for r in recs}
    assert all(r.status == "ok" for r in recs), [(r.name, r.reason) for r in recs]
    slow_gpu = by["slow-a"].metrics["device_lock"]["device"]
    other = {"gpu-0": "gpu-1", "gpu-1": "gpu-0"}[slow_gpu]
    lock = {n: r.metrics["device_lock"] for n, r in by.items()}
    assert {lock[n]["device"] for n in ("a1", "b0", "b1", "b2")} == {other}  # all on the free GPU
    slow_start = lock["slow-a"]["released_at"] - lock["slow-a"]["held_s"]
    assert all(slow_start < lock[n]["released_at"] < lock["slow-a"]["released_at"] for n in ("a1", "b0", "b1", "b2"))
    assert lock["slow-a"]["others_busy"] == [other] and all(lock[n]["others_busy"] == [slow_gpu] for n in lock
                                                              if n != "slow-a")
    for r in recs:  # pinned as computed, read back in the worker
        p = r.metrics["placement"]
        gpu = p["gpu"]
        assert f"gpu-{gpu}" == lock[r.name]["device"] and p["gpus_at_once"] == 2
        assert p["observed"]["cpus"] == p["cpus"] and p["n_cpus"] == 1 and p["cpus_from"] == slots[0].source
        env = p["observed"]["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == gpu and all(env[k] == "1" for k in placement.THREAD_ENV)
        assert all(env[k] == v for k, v in NO_MULTICAST.items())
    assert {r.metrics["placement"]["cpus"] for r in recs} == {placement.format_cpulist([c]) for c in
                                                               sorted(os.sched_getaffinity(0))[:2]}


def _record(name: str, samples: list[float], busy: list[str], sweep: str, end: float, gpu: str = "gpu-0",
            held: float = 10.0, at_once: int | None = None) -> rec.Record:
    med = sorted(samples)[len(samples) // 2]
    metrics = {"decode_tps": {"median": med}, "total_tps": {"median": med},
               "device_lock": {"device": gpu, "waited_s": 0.0, "others_busy": busy, "held_s": held,
                               "released_at": end}}
    if at_once:
        metrics["placement"] = {"gpu": gpu[4:], "gpus_at_once": at_once}
    return rec.Record(stage="bench_gpu", name=name, point={"precision": name}, config={},
                      model={"name": "m", "weights": "random"}, sweep_id=sweep, metrics=metrics,
                      environment={"hardware": {"id": "h200x2"}, "git": {}, "libraries": {}},
                      samples={"decode_tps": samples, "total_tps": samples})


def test_parallel_check_compares_each_point_with_itself_alone(tmp_path):
    path = tmp_path / "results" / "bench_gpu" / "h200.jsonl"
    rec.append(path, _record("fp16", [99.0, 100.0, 101.0], [], "alone", 10))
    rec.append(path, _record("fp16", [102.0, 103.0, 104.0], ["gpu-1"], "par", 10))  # +3 %: same figures
    rec.append(path, _record("nf4", [49.0, 50.0, 51.0], [], "alone", 20, "gpu-1"))
    rec.append(path, _record("nf4", [43.0, 44.0, 45.0], ["gpu-0"], "par", 20, "gpu-1"))  # -12 %: disturbed
    rec.append(path, _record("int8", [20.0, 20.0, 20.0], [], "alone", 30))  # never beside another: not compared
    rows = {r["name"]: r for r in compare(tmp_path / "results", "bench_gpu", 0.05)}
    assert set(rows) == {"fp16", "nf4"}
    assert rows["fp16"]["within_tolerance"] and rows["fp16"]["decode_tps"]["ratio"] == pytest.approx(1.03)
    assert not rows["nf4"]["within_tolerance"] and rows["nf4"]["beside"] == "gpu-0"
    assert rows["nf4"]["moved"] == ["decode_tps", "total_tps"]


def test_parallel_check_reads_the_configured_results_folder_and_names_the_points_that_moved(project, tmp_path,
                                                                                          capsys):
    """Records outside the repository (paths.results): the check reads them there, shows each point's ratio beside
    its own run-to-run spread, the two runs' times, and fails naming the points that moved."""
    from inferlab import cli

    results = tmp_path / "elsewhere"
    path = results / "bench_gpu" / "h200x2.jsonl"
    # parallel run: three points on two GPUs (20 s; the last one ran after the other GPU was done); alone run: the
    # same one after another (30 s)
    rec.append(path, _record("steady", [101.0, 102.0, 103.0], ["gpu-1"], "par", 1010, at_once=2))  # +2 %
    rec.append(path, _record("noisy", [85.0, 90.0, 95.0], ["gpu-0"], "par", 1010, "gpu-1", at_once=2))  # -10 %
    rec.append(path, _record("disturbed", [64.0, 65.0, 66.0], [], "par", 1020, at_once=2))  # -35 %: moved
    rec.append(path, _record("steady", [99.0, 100.0, 101.0], [], "alone", 2010, at_once=1))
    rec.append(path, _record("noisy", [92.0, 100.0, 108.0], [], "alone", 2020, at_once=1))  # 16 % spread
    rec.append(path, _record("disturbed", [99.5, 100.0, 100.5], [], "alone", 2030, at_once=1))
    assert cli.main(["parallel-check", "bench_gpu"]) == 2  # nothing in the repository's own results/
    assert "measured both alone and beside another GPU" in capsys.readouterr().err
    code = cli.main(["parallel-check", "bench_gpu", f"paths.results={results}", "--max-time-ratio", "0.6"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"records in {results / 'bench_gpu'}" in out
    assert "- parallel run par: 3 points on gpu-0,gpu-1, GPUs busy 20 s" in out
    assert "- alone run alone: 3 points on gpu-0, GPUs busy 30 s" in out
    assert "- parallel/alone time: 0.67 (at most 0.60 asked)" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["noisy"].endswith("| no |") and "±16.0%" in rows["noisy"] and "0.900" in rows["noisy"]
    assert rows["steady"].endswith("| no |") and "±5.0%" in rows["steady"]
    assert rows["disturbed"].endswith("| MOVED |") and "0.650" in rows["disturbed"]
    assert rows["disturbed"].startswith("| disturbed | gpu-0 | gpu-0 | - |")  # nothing beside it, in the parallel run
    assert ("parallel-check FAILED: 1 of 3 points moved beside another GPU: disturbed on gpu-0 (decode tok/s "
            "x0.650, allowed ±5.0%, total tok/s x0.650, allowed ±5.0%)") in err
    assert "the parallel run took 0.67 of the alone run's time, more than 0.60" in err
    assert cli.main(["parallel-check", f"paths.results={results}", "paths.nope=1"]) == 2
    assert "invalid configuration: paths.nope" in capsys.readouterr().err


def test_a_gpu_has_the_same_cores_alone_as_beside_the_others_and_too_many_gpus_fail_clearly():
    from inferlab.bench.gpu import gpu_slots

    both = gpu_slots(0, ["0", "1"])
    alone = gpu_slots(1, ["0", "1"])
    assert [s.gpu for s in both] == ["0", "1"] and [s.gpu for s in alone] == ["0"]
    assert alone[0].cpus == both[0].cpus and alone[0].host_gpus == ("0", "1")
    assert gpu_slots(0, []) == []  # no GPU: nothing placed (every point is skipped)
    with pytest.raises(SystemExit, match=r"bench_gpu.gpus: 3 GPUs at once asked for, but this host offers 2 \(0,1\)"):
        gpu_slots(3, ["0", "1"])
