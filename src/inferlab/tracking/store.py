"""The MLflow store: where it is, whether it answers, what its errors mean, and one client to it.

A SQLite store is created under a temporary name and renamed into place, so a kill mid-creation
leaves no half-made store; one left half-made by an older logger is set aside when it holds no
runs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from inferlab.config import TrackingConfig, project_root
from inferlab.hostlock import lock_dir, open_lock

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"


def tracking_uri(cfg: TrackingConfig) -> str:
    """config, else $MLFLOW_TRACKING_URI, else mlflow.db at the repository root.

    A queued DVC experiment runs in a temporary copy; DVC_ROOT names the repository it came from,
    so its runs land in the same store."""
    if cfg.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.uri or os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else project_root()
    return f"{SQLITE}{root / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float) -> str | None:
    """None if the tracking store answers; otherwise why not."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                return None if r.status == 200 else f"HTTP {r.status} from {uri}/health"
        except (urllib.error.URLError, OSError) as e:
            return f"{uri} did not answer ({getattr(e, 'reason', e)})"
    if uri.startswith(SQLITE):
        folder = Path(uri[len(SQLITE):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"the folder of the SQLite store {folder} is missing or not writable"
    return None


class StoreFailure(RuntimeError):
    """The store cannot be used at all (unreachable, damaged, failing every request)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind  # "unreachable" or "failed"


_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS",
             "RESOURCE_DOES_NOT_EXIST", "RESOURCE_LIMIT_EXCEEDED"}
_NO_ANSWER = {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "MaxRetryError",
              "NewConnectionError"}


def classify(e: BaseException) -> tuple[str, str]:
    """("unreachable" | "rejected" | "failed", reason) for an error of MLflow's client or store.

    unreachable: no answer (refused, timeout, a SQLite file that cannot be opened); rejected: this
    request is not acceptable (a name, a value, a state); failed: the store's own error."""
    if isinstance(e, StoreFailure):
        return e.kind, str(e)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    chain, cause = [], e
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(c).__name__ for c in chain}
    if names & _NO_ANSWER or re.match(r"API request to \S+ failed with", text):
        return "unreachable", text
    if "unable to open database file" in text or "database is locked" in text:
        return "unreachable", text
    code = getattr(e, "error_code", None)
    if code in _REJECTED:
        return "rejected", text
    if type(e).__module__.startswith(("mlflow", "sqlalchemy", "sqlite3")):
        return "failed", f"{type(e).__name__}: {text}"
    # the record itself: a field of the wrong shape
    return "rejected", f"{type(e).__name__}: {text}"


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Loggers on one host take turns with a store.

    Two creating a SQLite store at once would run its migrations over each other; two logging the
    same records through a server would both create runs. A SQLite store's lock lies beside it
    (hosts sharing its folder take turns too); a server's in the host's lock folder."""
    if uri.startswith(SQLITE):
        db = Path(uri[len(SQLITE):])
        path = db.with_name(db.name + ".lock")
    else:
        path = lock_dir() / f"inferlab-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.lock"
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is logging to %s", uri)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_client(uri: str, timeout_s: float) -> Any:
    """An MlflowClient to the store, a SQLite one made whole first."""
    # don't hang for minutes on a dead server
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout_s, 1) * 4)))
    # a line (and a request) per run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    if uri.startswith(SQLITE):
        prepare_sqlite(Path(uri[len(SQLITE):]))
    return MlflowClient(tracking_uri=uri)


def _holds_runs(db: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False  # no runs table: nothing of value in it


def _open_sqlite(uri: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)  # opens the store: creates or checks its tables
    return client


def _forget_engine(uri: str) -> None:
    """Drop MLflow's engine for the URI: it keeps one per process, open on the file it opened."""
    # MLflow's internals: without them, only the replaced file stays open a while
    with suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


def prepare_sqlite(db: Path) -> None:
    """Make a SQLite store whole or not at all (under the store's lock).

    Its tables are made under a temporary name, then renamed into place. A half-made store that
    holds no runs is moved aside (mlflow.db.broken-<time>) and made anew; one with runs is
    reported."""
    for stale in db.parent.glob(f".{db.name}.creating-*"):
        stale.unlink(missing_ok=True)
    if db.exists():
        try:
            _open_sqlite(f"{SQLITE}{db}")  # MLflow keeps the store it opened for this process
            return
        except Exception as e:  # noqa: BLE001 - any failure to open it is judged below
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            _forget_engine(f"{SQLITE}{db}")
        if _holds_runs(db):
            raise StoreFailure("failed",
                               f"the SQLite store {db} cannot be opened ({problem}); it holds "
                               "runs, so it was left as it is: back it up, then try `mlflow db "
                               f"upgrade {SQLITE}{db}`, or move it aside to start a new store")
        aside = db.with_name(f"{db.name}.broken-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("-journal", "-wal", "-shm", ""):  # its journal too, or SQLite replays it
            if db.with_name(db.name + suffix).exists():  # on the new store
                os.replace(db.with_name(db.name + suffix), aside.with_name(aside.name + suffix))
        log.warning("the SQLite store %s could not be opened (%s), probably left half-made by "
                    "a process killed while creating it; it held no runs and was moved to %s; "
                    "making a new one",
                    db, problem, aside.name)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    log.info("creating the MLflow store %s", db)
    try:
        _open_sqlite(f"{SQLITE}{tmp}")
        _forget_engine(f"{SQLITE}{tmp}")
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)
