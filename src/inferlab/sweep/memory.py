"""Peak memory per sweep point, and the machine's memory bandwidth for the roofline.

Peak RSS: Linux keeps a process's high-water mark (VmHWM); writing "5" to
/proc/self/clear_refs resets it, so a worker measures each point's peak apart.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def cpu_bandwidth(gib: float = 1.0, repeats: int = 5, threads: int | None = None) -> dict:
    """Memory bandwidth with every usable core, over buffers far larger than the caches.

    Two multi-threaded torch kernels: a copy (bytes read + written) and a sum (bytes read).
    Decoding reads the weights, so the roofline uses the faster of the two; both are recorded.
    """
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    try:
        src, dst = torch.rand(n), torch.empty(n)
        kernels = (("copy", lambda: dst.copy_(src), 8 * n), ("read", lambda: src.sum(), 4 * n))
        results: dict = {}
        for name, fn, nbytes in kernels:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[f"{name}_gbps"] = round(nbytes / sorted(times)[len(times) // 2] / 1e9, 2)
    finally:
        torch.set_num_threads(previous)
    method = f"torch multi-threaded copy (read+write) and sum (read), median of {repeats}"
    results.update(bandwidth_gbps=max(results["copy_gbps"], results["read_gbps"]),
                   buffer_gib=gib, threads=threads, method=method)
    log.info("memory bandwidth with %d threads: copy %.1f GB/s, read %.1f GB/s", threads,
             results["copy_gbps"], results["read_gbps"])
    return results


def gpu_bandwidth(gib: float = 2.0, repeats: int = 20) -> dict:
    """Device-to-device copy bandwidth (bytes read + written), timed with CUDA events."""
    import torch

    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    bw = 4 * n / sorted(times)[len(times) // 2] / 1e9
    return {"bandwidth_gbps": round(bw, 1), "copy_gbps": round(bw, 1), "buffer_gib": gib,
            "method": f"device-to-device copy (read+write), CUDA events, median of {repeats}"}


def roofline(bandwidth_gbps: float, weight_bytes: int, decode_tps: float | None) -> dict:
    """The fastest batch-1 decode (each weight read once per token) and the fraction reached."""
    limit = bandwidth_gbps * 1e9 / weight_bytes if weight_bytes else float("nan")
    out = {"roofline_tps": round(limit, 2), "weight_bytes": weight_bytes,
           "bandwidth_gbps": bandwidth_gbps}
    if decode_tps is not None and limit == limit:
        out["roofline_fraction"] = round(decode_tps / limit, 4)
    return out


def process_gpu_gib() -> float | None:
    """GPU GiB this process holds over all devices, as NVML (else nvidia-smi) says; None if neither.

    llama.cpp allocates weights, KV cache and compute buffers when the model and context are
    created, so the figure after a point is its peak."""
    try:
        import pynvml
    except ImportError:
        return _nvidia_smi_gib()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return _nvidia_smi_gib()
    try:
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total / 2**30
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_gib() -> float | None:
    import subprocess

    try:
        query = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        r = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    rows = (line.split(",")[:2] for line in r.stdout.splitlines() if "," in line)
    mib = [float(used) for pid, used in rows
           if pid.strip() == str(os.getpid()) and used.strip().replace(".", "", 1).isdigit()]
    return sum(mib) / 1024 if mib else None
