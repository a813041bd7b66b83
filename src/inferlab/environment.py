"""What every record says about where it was made: libraries, hardware, git commit, Slurm job."""

from __future__ import annotations

import functools
import os
import platform
import re
import socket
import subprocess
from importlib import metadata

from inferlab import hostlock, slurm
from inferlab.config import BNB_PRECISIONS, TORCHAO_PRECISIONS, project_root

LIBRARIES = (
    "inferlab", "torch", "transformers", "tokenizers", "accelerate", "bitsandbytes",
    "llama-cpp-python",
    "gguf", "huggingface-hub", "hydra-core", "omegaconf", "dvc", "mlflow", "numpy",
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["inferlab"] is None:  # run from a source tree (PYTHONPATH=src) rather than installed
        import inferlab

        out["inferlab"] = inferlab.__version__
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, str | bool | None]:
    """The commit of the code that made the record, and whether the tree had changes."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=project_root(), capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    # A copy of the working tree (a lent GPU machine) may carry a stale .git: the commit it was
    # copied from, given in INFERLAB_GIT_COMMIT, wins over what that .git says.
    given = os.environ.get("INFERLAB_GIT_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "source": "INFERLAB_GIT_COMMIT"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict]:
    """GPUs as the driver reports them (name, memory, driver, clocks); empty without NVIDIA."""
    query = ("name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,"
             "pci.bus_id")
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if r.returncode != 0:
        return []
    gpus = []
    for line in r.stdout.strip().splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) < 8:
            continue
        gpus.append({
            "name": f[0], "memory_mib": _num(f[1]), "driver": f[2], "max_sm_clock_mhz": _num(f[3]),
            "max_mem_clock_mhz": _num(f[4]), "sm_clock_mhz": _num(f[5]),
            "mem_clock_mhz": _num(f[6]), "pci_bus_id": f[7],
        })
    return gpus


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def instance_id(host: str, boot: str | None, gpus: list[dict]) -> str:
    """Which machine instance measured: host, boot and GPU bus ids hashed.

    Figures of host-bound points move from instance to instance, so the report compares only
    points measured in one sweep on one instance."""
    import hashlib

    blob = "|".join([host, boot or "no-boot-id", *(g.get("pci_bus_id") or "" for g in gpus)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def hardware() -> dict:
    import psutil

    gpus = gpu_info()
    cpu = _cpu_model()
    host, boot = socket.gethostname(), hostlock.boot_id()
    boot = None if boot == hostlock.UNKNOWN else boot
    return {
        "host": host,
        "boot_id": boot,
        "instance": instance_id(host, boot, gpus),
        "cpu": cpu,
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "os": f"{platform.system()} {platform.release()}",
        "gpus": gpus,
        "id": hardware_id(cpu, gpus),
    }


def hardware_id(cpu: str, gpus: list[dict]) -> str:
    """A short readable name for the hardware, used to keep results of different machines apart."""
    if gpus:
        name = gpus[0]["name"].replace("NVIDIA ", "")
        base = f"{name}x{len(gpus)}" if len(gpus) > 1 else name
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        base = f"cpu-{n}c-{cpu}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()
    return slug[:60]


def cuda_problem() -> str | None:
    """None where a CUDA device can run transformers points; otherwise why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"no CUDA device on this machine (torch {torch.__version__}, "
                "torch.cuda.is_available() is False)")
    return None


def missing_package(precision: str) -> str | None:
    """Why a transformers precision cannot load here (its package is not installed), or None."""
    from importlib.util import find_spec

    if precision in BNB_PRECISIONS and find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'inferlab[gpu]')"
    if precision in TORCHAO_PRECISIONS and find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    return None


def environment() -> dict:
    job = slurm.job()
    return {"libraries": library_versions(), "hardware": hardware(), "git": git_commit(),
            **({"slurm": job} if job else {})}
