"""How much one busy core slows another on this host: a pure-Python loop timed alone on cpu 0, then on cpu 0
beside the same loop on another cpu (an SMT sibling or not), then beside 15 others. Prints the topology first.
   python3 scripts/cpu_contention.py"""
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path


def spin(cpu: int, reps: int, q) -> None:
    os.sched_setaffinity(0, {cpu})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x = 0
        for i in range(3_000_000):
            x += i
        times.append(time.perf_counter() - t)
    q.put((cpu, statistics.median(times[1:])))


def run(cpus: list[int], reps: int = 6) -> float:
    q = mp.Queue()
    ps = [mp.Process(target=spin, args=(c, reps, q)) for c in cpus]
    [p.start() for p in ps]
    out = dict(q.get() for _ in ps)
    [p.join() for p in ps]
    return out[cpus[0]]


if __name__ == "__main__":
    cpu = Path("/sys/devices/system/cpu")
    for c in (0, 1, 8, 16, 31):
        sib = cpu / f"cpu{c}/topology/thread_siblings_list"
        core = cpu / f"cpu{c}/topology/core_id"
        print(f"cpu{c}: siblings {sib.read_text().strip() if sib.exists() else '?'}, "
              f"core {core.read_text().strip() if core.exists() else '?'}")
    base = run([0])
    print(f"cpu0 alone: {base * 1e3:.1f} ms per loop")
    for other in ([1], [8], [16], list(range(1, 16)), list(range(16, 32)), list(range(1, 32))):
        t = run([0] + other)
        print(f"cpu0 beside {len(other)} busy cpu(s) {other[0]}..{other[-1]}: {t * 1e3:.1f} ms, x{base / t:.3f} speed")
