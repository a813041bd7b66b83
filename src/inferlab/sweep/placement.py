"""Where a sweep's points run on a host with several GPUs: each GPU with its own share of cores.

On two H200s (issue 22) host-bound points ran at 0.65-0.92x of their speed alone when another
GPU's job shared their cores. So each GPU's workers are pinned to their own cores, on its NUMA
node where the host says which, and every thread pool is sized to that share. A share is the
same beside other GPUs or alone, so both measure the same thing.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferlab import NO_MULTICAST
from inferlab.sweep.locks import device_key

log = logging.getLogger(__name__)

# Thread pools that read their size from the environment when their library loads.
THREAD_ENV = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
    "TORCHINDUCTOR_COMPILE_THREADS",
)
SYSFS = Path("/sys")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; '' or 'N/A' -> []."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            cpus.extend(range(lo, hi + 1))
    return sorted(set(cpus))


def format_cpulist(cpus: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    out: list[str] = []
    xs = sorted(set(cpus))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_topo(text: str) -> dict[str, dict[str, Any]]:
    """`nvidia-smi topo -m` -> {"0": {"cpus": [...], "numa": "0"}, ...} for each GPU row.

    One column per GPU and NIC, then "CPU Affinity", "NUMA Affinity": cells hold no spaces, so
    a row's affinity is the cell after its link cells. Escape codes are dropped."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]
    header = next((line for line in lines if "CPU Affinity" in line), None)
    if header is None:
        return {}
    links = sum(1 for cell in header.split() if re.fullmatch(r"(GPU|NIC)\d+", cell))
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        cells = line.split()
        m = re.fullmatch(r"GPU(\d+)", cells[0]) if cells else None
        if not m or len(cells) < links + 2:
            continue
        cpus = parse_cpulist(cells[1 + links])
        numa = cells[2 + links] if len(cells) > 2 + links else "N/A"
        if cpus:
            out[m.group(1)] = {"cpus": cpus, "numa": None if numa == "N/A" else numa}
    return out


def topo_affinity() -> dict[str, dict[str, Any]]:
    """Each GPU's cores and NUMA node as `nvidia-smi topo -m` gives them; {} where it cannot."""
    try:
        r = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_topo(r.stdout) if r.returncode == 0 else {}


def sysfs_affinity(bus_ids: dict[str, str], root: Path = SYSFS) -> dict[str, dict[str, Any]]:
    """Each GPU's cores from its PCI device in sysfs (`local_cpulist`, `numa_node`).

    nvidia-smi writes '00000000:18:00.0', sysfs a 4-digit domain: '0000:18:00.0'."""
    out: dict[str, dict[str, Any]] = {}
    for gpu, bus in bus_ids.items():
        dev = root / "bus" / "pci" / "devices" / bus.lower()[-12:]
        try:
            cpus = parse_cpulist((dev / "local_cpulist").read_text())
        except OSError:
            continue
        try:
            numa = (dev / "numa_node").read_text().strip()
        except OSError:
            numa = "-1"
        if cpus:
            out[gpu] = {"cpus": cpus, "numa": None if numa.startswith("-") else numa}
    return out


def _bus_ids() -> dict[str, str]:
    from inferlab.environment import gpu_info

    return {str(i): g["pci_bus_id"] for i, g in enumerate(gpu_info()) if g.get("pci_bus_id")}


def siblings(cpus: list[int], root: Path = SYSFS) -> list[list[int]]:
    """The cores grouped by physical core (siblings together); one per core if sysfs is silent."""
    groups: dict[tuple[int, ...], list[int]] = {}
    allowed = set(cpus)
    for c in sorted(cpus):
        try:
            topology = root / "devices" / "system" / "cpu" / f"cpu{c}" / "topology"
            text = (topology / "thread_siblings_list").read_text()
            key = tuple(x for x in parse_cpulist(text) if x in allowed) or (c,)
        except OSError:
            key = (c,)
        groups.setdefault(key, []).append(c)
    return sorted(groups.values())


def split(cpus: list[int], parts: int, root: Path = SYSFS) -> list[list[int]]:
    """`cpus` in `parts` nearly equal shares, in order, a physical core's siblings in one share.

    Unless there are fewer physical cores than shares."""
    cores = siblings(cpus, root)
    if len(cores) < parts:
        cores = [[c] for c in sorted(cpus)]
    out: list[list[int]] = []
    for i in range(parts):
        chunk = cores[len(cores) * i // parts:len(cores) * (i + 1) // parts]
        out.append(sorted(c for core in chunk for c in core))
    return out


@dataclass(frozen=True)
class Slot:
    """Where a sweep runs its points, one at a time: a GPU with its share of the host's cores.

    gpu None: the host as it is, unpinned, each point locking the device it computes on."""

    gpu: str | None = None  # as the host names it (CUDA_VISIBLE_DEVICES for its workers)
    cpus: tuple[int, ...] = ()  # the cores its workers run on; empty: not pinned
    source: str = ""  # where the share came from: nvidia-smi topo -m, sysfs, an even split
    numa: str | None = None  # the GPU's NUMA node where the host says
    host_gpus: tuple[str, ...] = ()  # every GPU of the host: which measured beside a point

    def key(self, device: str) -> str:
        """The device lock a point takes: this GPU's, or (unplaced) its device's."""
        return f"gpu-{self.gpu}" if self.gpu is not None else device_key(device)

    def env(self) -> dict[str, str]:
        """The environment its spawned worker processes start with."""
        env = dict(NO_MULTICAST)
        if self.gpu is not None:  # numbered as nvidia-smi does (CUDA's own order may differ)
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=self.gpu)
        if self.cpus:
            env.update({k: str(len(self.cpus)) for k in THREAD_ENV})
        return env

    def describe(self, at_once: int) -> dict[str, Any]:
        return {
            "gpu": self.gpu, "cpus": format_cpulist(self.cpus), "n_cpus": len(self.cpus),
            "cpus_from": self.source, "numa": self.numa, "gpus_at_once": at_once,
        }


def cpu_shares(gpus: list[str], affinity: dict[str, dict[str, Any]], allowed: list[int],
               source: str, root: Path = SYSFS) -> dict[str, Slot]:
    """Each GPU's cores: its affinity within `allowed`, split among the GPUs sharing it.

    An even split of `allowed` where the host says nothing (or leaves a GPU no core)."""
    allowed_set = set(allowed)
    by_node: dict[tuple[int, ...], list[str]] = {}
    for g in gpus:
        cpus = tuple(c for c in affinity.get(g, {}).get("cpus", []) if c in allowed_set)
        by_node.setdefault(cpus, []).append(g)
    slots: dict[str, Slot] = {}
    taken: set[int] = set()
    for cpus, members in by_node.items():  # GPUs on one NUMA node split its cores
        free = [c for c in cpus if c not in taken]
        if len(free) < len(members):  # unknown, or too few cores left: split evenly below
            slots = {}
            break
        for g, share in zip(members, split(free, len(members), root)):
            slots[g] = Slot(g, tuple(share), source, affinity[g].get("numa"), tuple(gpus))
        taken.update(free)
    if slots:
        return slots
    if len(allowed_set) < len(gpus):
        unpinned = "not pinned: fewer usable cores than GPUs"
        return {g: Slot(g, (), unpinned, None, tuple(gpus)) for g in gpus}
    shares = split(sorted(allowed_set), len(gpus), root)
    even = "even split of the usable cores"
    return {g: Slot(g, tuple(shares[i]), even, None, tuple(gpus)) for i, g in enumerate(gpus)}


def host_slots(gpus: list[str]) -> dict[str, Slot]:
    """Each GPU of this host with its share of the cores this process may use."""
    has_affinity = hasattr(os, "sched_getaffinity")
    allowed = sorted(os.sched_getaffinity(0)) if has_affinity else list(range(os.cpu_count() or 1))
    if all(g.isdigit() for g in gpus):  # UUIDs and MIG names match no topology
        topo = topo_affinity()
        if topo and all(g in topo for g in gpus):
            return cpu_shares(gpus, topo, allowed, "nvidia-smi topo -m")
        pci = sysfs_affinity(_bus_ids())
        if pci and all(g in pci for g in gpus):
            return cpu_shares(gpus, pci, allowed, "sysfs local_cpulist")
    return cpu_shares(gpus, {}, allowed, "")


def apply(cpus: list[int], runtime: str) -> None:
    """In a worker process, first thing: run on `cpus` only, with torch's pools that size."""
    os.sched_setaffinity(0, cpus)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # its pool: RAYON_NUM_THREADS
    if runtime == "hf":
        import torch

        torch.set_num_threads(len(cpus))
        try:
            torch.set_num_interop_threads(len(cpus))
        except RuntimeError as e:  # only possible before any inter-op work; recorded either way
            log.warning("torch inter-op threads left at %d: %s",
                        torch.get_num_interop_threads(), e)


def observed() -> dict[str, Any]:
    """What a worker process runs with, read back: cores, thread pools, environment."""
    keys = ("CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM", *THREAD_ENV, *NO_MULTICAST)
    out: dict[str, Any] = {
        "cpus": format_cpulist(sorted(os.sched_getaffinity(0))),
        "env": {k: os.environ.get(k) for k in keys},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    return out
