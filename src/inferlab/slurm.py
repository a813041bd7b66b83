"""The Slurm job this process runs in: what its records say about it, and why Slurm is ending it.

Slurm ends a job with SIGTERM (scancel, its time limit), and submitit warns a job near its time
limit with USR2 (`signal_delay_s` before it) and raises in the job's main thread. submitit
ignores SIGTERM: a stage in a Slurm job raises `JobEnding` on it instead, so the stage stops,
keeps what it measured and returns to submitit, which writes the job's result (without one, the
launcher can only learn the job's end from `sacct`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
        "SLURM_JOB_PARTITION", "SLURMD_NODENAME", "SLURM_CLUSTER_NAME", "SLURM_RESTART_COUNT")
# sent to every process of a job step
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class JobEnding(RuntimeError):
    """Slurm sent this job SIGTERM: it is being cancelled or has reached its time limit."""


def job() -> dict[str, str] | None:
    """The Slurm job this process runs in (id, array task, node, partition); None outside Slurm."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    return {k: os.environ[k] for k in VARS if os.environ.get(k)}


def job_name(j: dict[str, str]) -> str:
    """The id Slurm's commands show: 12_3 for an array task, else 12."""
    if j.get("SLURM_ARRAY_JOB_ID") and j.get("SLURM_ARRAY_TASK_ID"):
        return f"{j['SLURM_ARRAY_JOB_ID']}_{j['SLURM_ARRAY_TASK_ID']}"
    return j["SLURM_JOB_ID"]


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, TimeLimit, RunTime, EndTime, NodeList,
    ...); empty when the controller does not answer."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def stop_on_sigterm() -> Callable[[], None]:
    """In a Slurm job's main thread: SIGTERM raises JobEnding. Returns what puts the earlier
    handler back and kills the workers still running (they ignore SIGTERM here, which
    multiprocessing's exit would wait on)."""
    if job() is None or threading.current_thread() is not threading.main_thread():
        return lambda: None

    def ending(signum: int, frame: object) -> None:
        raise JobEnding(f"Slurm sent SIGTERM to job {job_name(job() or {})}")

    def restore() -> None:
        signal.signal(signal.SIGTERM, earlier)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(10)

    earlier = signal.signal(signal.SIGTERM, ending)
    return restore


def leave_signals_to_parent() -> None:
    """In a worker process of a Slurm job: Slurm's and submitit's signals reach every process of
    the job; the sweep that started this worker decides what they mean and stops it."""
    if job() is not None:
        for s in WORKER_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def time_limit_reason(error: BaseException) -> str | None:
    """Why a point stopped by `error` failed, in Slurm's words, when the job hit its time limit.

    None when it does not (cancelled, preempted and requeued, or no Slurm job): such a point is
    measured again."""
    j = job()
    if j is None:
        return None
    info = show_job(job_name(j))
    at_limit = info.get("Reason") == "TimeLimit" or info.get("JobState") == "TIMEOUT"
    # submitit on USR2
    warned = type(error).__name__ == "UncompletedJobError" and "timed-out" in str(error)
    if not (at_limit or warned):
        return None
    keys = ("TimeLimit", "RunTime", "JobState", "Reason", "EndTime")
    said = " ".join(f"{k}={info[k]}" for k in keys if k in info)
    how = ("was ended at its time limit" if at_limit
           else "reached its time limit (Slurm's warning signal)")
    return (f"Slurm job {job_name(j)} on {j.get('SLURMD_NODENAME', '?')} {how} while this "
            f"point ran: {said or 'scontrol did not answer'}; {type(error).__name__}: {error} "
            "(hydra.launcher.timeout_min gives each job longer)")
