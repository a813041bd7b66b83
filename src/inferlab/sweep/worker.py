"""Sweep points run in worker processes, one per loaded model.

A worker loads its backend and runs the points it is sent one by one, resetting the peak RSS and
CUDA's peak counters before each. A point that crashes the process, hangs or raises is recorded
as failed by the parent, which starts a fresh worker for the points that remain.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inferlab import LLAMA_PROCESS_ENV, slurm

log = logging.getLogger(__name__)

# What a worker runs for each point (bench.registry.run):
# (backend, point, folder, name) -> metrics, samples, files
Measure = Callable[[Any, dict[str, Any], Path, str], tuple[dict[str, Any], dict[str, Any], dict[str, str]]]

# for tests: "<substring of a point name>:<oom|crash|error|hang|slow=SECONDS>"
FAIL_ENV = "INFERLAB_INJECT_FAILURE"
_SPAWN = threading.Lock()  # workers start one at a time: each with the environment meant for it


def _inject(name: str) -> None:
    spec = os.environ.get(FAIL_ENV, "")
    if ":" not in spec:
        return
    target, kind = spec.rsplit(":", 1)
    if target not in name:
        return
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)
    if kind.startswith("slow="):  # a point that takes longer, and then runs as usual
        time.sleep(float(kind.split("=", 1)[1]))
        return
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (injected for a test)"
        )
    raise RuntimeError(f"injected failure in {name}")


def _gpu_peaks_reset(runtime: str) -> bool:
    if runtime != "hf":  # llama.cpp allocates outside torch: a torch context would only add
        return False
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return True


def _gpu_peaks() -> dict[str, float]:
    import torch

    torch.cuda.synchronize()
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def worker_main(conn, runtime: str, load_settings: dict[str, Any], measure: Measure,
                cpus: list[int] | None = None) -> None:
    """Entry point of a worker process: receive points, send back (status, payload).

    With `cpus` it runs on those cores only, and every point records what it ran with."""
    from inferlab.logs import setup_logging
    from inferlab.sweep import placement

    # Ctrl-C reaches the whole group: the parent stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    slurm.leave_signals_to_parent()
    if cpus:
        placement.apply(cpus, runtime)
    from inferlab.backends import BackendUnavailable, get_backend
    from inferlab.sweep.memory import peak_rss_mib, reset_peak_rss, rss_mib

    backend = None
    load_info: dict[str, Any] = {}
    # llama.cpp's context settings (threads, batch, KV type) are load settings
    reload_each_point = runtime == "llama_cpp"
    while True:
        msg = conn.recv()
        if msg is None:
            break
        point, name, folder = msg["point"], msg["name"], Path(msg["folder"])
        try:
            _inject(name)
            gc.collect()
            gpu = _gpu_peaks_reset(runtime)
            reset_peak_rss()
            if backend is None or reload_each_point:
                settings = {**load_settings, **msg.get("load", {}), **point}
                backend = get_backend(runtime)(settings)
                load_info = backend.load()
                load_info["load_peak_rss_mib"] = peak_rss_mib()
                reset_peak_rss()  # the point's peak: the loaded model plus what running it needs
            else:
                backend.settings.update({**msg.get("load", {}), **point})
            rss_before = rss_mib()
            metrics, samples, artifacts = measure(backend, point, folder, name)
            metrics.update({k: round(v, 4) if isinstance(v, float) else v
                            for k, v in load_info.items()})
            metrics["peak_rss_mib"] = round(peak_rss_mib(), 1)
            metrics["rss_before_mib"] = round(rss_before, 1)
            if gpu:
                metrics.update({k: round(v, 4) for k, v in _gpu_peaks().items()})
            if cpus:
                metrics["placement"] = placement.observed()
            elif point.get("device") == "cuda":  # llama.cpp on the GPU: what the driver says
                from inferlab.sweep.memory import process_gpu_gib

                used = process_gpu_gib()
                if used is not None:
                    metrics["gpu_process_gib"] = round(used, 4)
            conn.send(("ok", {"metrics": metrics, "samples": samples, "artifacts": artifacts}))
        except BackendUnavailable as e:
            conn.send(("skipped", {"reason": str(e)}))
        except BaseException as e:  # recorded as failed; the parent restarts the worker
            reason = f"out of memory: {e}" if _is_oom(e) else f"{type(e).__name__}: {e}"
            trace = traceback.format_exc()[-4000:]
            conn.send(("failed", {"reason": reason[:2000], "traceback": trace}))
        finally:
            if reload_each_point and backend is not None:
                backend.unload()
                backend = None


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """Processes started inside the block inherit `extra` in their environment.

    One block at a time: sweeps on several GPUs start workers from several threads."""
    with _SPAWN:
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class Worker:
    """The parent's handle on one worker process; `env` is added to its environment at start.

    `measure` (a module-level function) runs each point."""

    def __init__(self, runtime: str, load_settings: dict[str, Any],
                 env: dict[str, str] | None = None, cpus: list[int] | None = None, *,
                 measure: Measure):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no memory or CUDA state inherited
        self.conn, child = ctx.Pipe()
        args = (child, runtime, load_settings, measure, cpus)
        self.proc = ctx.Process(target=worker_main, args=args, daemon=True)
        env = dict(env or {})
        if runtime == "llama_cpp":  # `import inferlab` loads llama.cpp first in that process
            env[LLAMA_PROCESS_ENV] = "1"
        with _environment(env):
            self.proc.start()
        child.close()

    def run(self, point: dict, name: str, folder: str, timeout: float,
            load: dict | None = None) -> tuple[str, dict]:
        """Run one point; `load`: settings outside its identity (paths, texts).

        A worker found dead (killed while waiting for the device lock, say) fails this point only."""
        if not self.proc.is_alive():
            return "failed", {"reason": self._not_started()}
        try:
            self.conn.send({"point": point, "name": name, "folder": folder, "load": load or {}})
        except (BrokenPipeError, ConnectionError, OSError):
            return "failed", {"reason": self._not_started()}
        if not self.conn.poll(timeout):
            self.kill()
            return "failed", {"reason": f"timed out after {timeout:.0f} s; the worker was stopped"}
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError):
            return "failed", {"reason": self._death()}

    def signalled(self) -> int | None:
        """SIGINT or SIGTERM when the worker died of one: the sweep was interrupted."""
        code = self.proc.exitcode
        return -code if code in (-signal.SIGINT, -signal.SIGTERM) else None

    def _not_started(self) -> str:
        return f"{self._death()} before the point started; the point was not run"

    def _death(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        sig = f" ({signal.Signals(-code).name})" if code is not None and code < 0 else ""
        return f"the worker process died with exit code {code}{sig}"

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
            self.proc.join(30)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
