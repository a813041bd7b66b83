"""All MLflow logging goes through here, and always from records.

One parent run per stage execution (a sweep), one nested child run per record (a sweep point), tagged with the
record's id, so records written while the tracking store was unreachable can be logged later with
`inferlab log-records`, and logging the same records again creates nothing. A run's start and end are the
measurement's own (so the UI's Duration is the point's), the evaluation data is the quality runs' dataset input,
and their per-sample outputs are a table artifact.

What can go wrong, and what happens then:
- a name MLflow does not accept (`ms_per_step_by_kind.fused (Triton)`): rewritten, the same way every time;
- a record the store rejects: reported with the store's reason, and the other records are still logged;
- a store that cannot be reached (or that fails as a whole) is told apart from one that rejects a record;
- a logger killed or refused midway: every run it starts is finished, or marked failed (`inferlab.logged` =
  false); a run left incomplete is replaced by the next logger;
- two loggers at once: on one host they take turns (a lock per store); across hosts, the runs two loggers made
  for the same record are found when each has finished, and all but the first are deleted;
- a SQLite store is created under a temporary name and renamed into place, so a kill mid-creation leaves no
  half-made store; one left half-made by an older logger is set aside when it holds no runs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferlab.config import TrackingConfig, project_root
from inferlab.fields import GROUP_PARAMS, figures  # GROUP_PARAMS: the settings runs are grouped and compared by
from inferlab.hostlock import boot_id, lock_dir, open_lock
from inferlab.records import Record

log = logging.getLogger(__name__)

TAG_RECORD = "inferlab.record_id"
TAG_SWEEP = "inferlab.sweep_id"
TAG_KIND = "inferlab.kind"
TAG_LOGGED = "inferlab.logged"  # "false": a run its logger could not finish (marked failed; replaced next time)
TAG_LOGGER = "inferlab.logger"  # host:boot:pid of the process that made the run
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI
# MLflow 3's UI opens an experiment without a kind on its GenAI overview (traces, costs); this kind opens its runs
KIND_TAG, KIND_RUNS = "mlflow.experimentKind", "custom_model_development"
RUN_STATUS = {"ok": "FINISHED", "skipped": "FINISHED", "failed": "FAILED"}  # skipped: expected here, not an error
MAX_PARAM_LEN = 500
MAX_NAME_LEN = 250  # MLflow's limit for metric and param names
STALE_S = 600  # an unfinished run of a logger on another host is taken as dead after this long
PENDING_WAIT_S = 60  # how long to wait for a record that a live logger elsewhere is logging


def tracking_uri(cfg: TrackingConfig) -> str:
    """config, else $MLFLOW_TRACKING_URI, else mlflow.db at the repository root. A queued DVC experiment runs
    in a temporary copy; DVC_ROOT names the repository it came from, so its runs land in the same store."""
    if cfg.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.uri or os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else project_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float) -> str | None:
    """None if the tracking store answers; otherwise why not."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                return None if r.status == 200 else f"HTTP {r.status} from {uri}/health"
        except (urllib.error.URLError, OSError) as e:
            return f"{uri} did not answer ({getattr(e, 'reason', e)})"
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"the folder of the SQLite store {folder} is missing or not writable"
    return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out



_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. /:]")  # MLflow's names: alphanumerics, _ - . space : /
_renamed: set[str] = set()  # names already said to be rewritten (said once per process)


def mlflow_name(name: str) -> str:
    """A metric or param name MLflow accepts, the same for the same name every time: a character it does not
    allow becomes '_', path parts it would resolve ('', '.', '..') are dropped or replaced, and a name longer
    than 250 characters is cut and ends with a digest of the whole."""
    clean = "/".join("__" if part == ".." else part for part in _NOT_ALLOWED.sub("_", name).split("/")
                     if part not in ("", "."))
    if clean.startswith(".."):
        clean = "__" + clean[2:]
    clean = clean or "_"
    if len(clean) > MAX_NAME_LEN:
        clean = f"{clean[:MAX_NAME_LEN - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return clean


def _allowed_names(values: dict[str, Any]) -> dict[str, Any]:
    """The same values under names MLflow accepts. A rewritten name that meets another name gets a digest of its
    original, so two names never become one; names that need no rewriting keep theirs."""
    out = {k: v for k, v in values.items() if mlflow_name(k) == k}
    for k in sorted(set(values) - set(out)):
        new = mlflow_name(k)
        if new in out:
            new = mlflow_name(f"{new[:MAX_NAME_LEN - 17]}-{hashlib.sha256(k.encode()).hexdigest()[:16]}")
        out[new] = values[k]
        if k not in _renamed:
            _renamed.add(k)
            log.info("MLflow does not accept the name %r: logged as %r (record.json keeps the original)", k, new)
    return out


def _params(record: Record) -> dict[str, str]:
    flat = flatten({"model": record.model, **record.config})
    flat.update(flatten(record.point, "point."))
    flat.update({k: record.point[k] for k in GROUP_PARAMS if record.point.get(k) not in (None, "")})
    flat["hardware"] = record.environment.get("hardware", {}).get("id")
    return _allowed_names({k: str(v)[:MAX_PARAM_LEN] for k, v in flat.items()})


def _metrics(record: Record) -> dict[str, float]:
    """The record's figures by the field table of its stage (record.json keeps all it measured)."""
    out = {}
    for k, v in flatten(figures(record)).items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and v == v:  # drop NaN
            out[k] = float(v)
    return _allowed_names(out)


def _quoted(value: str) -> str:
    """A string literal for an MLflow filter."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


class StoreFailure(RuntimeError):
    """The store cannot be used at all (unreachable, damaged, or failing every request): nothing more is tried."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind  # "unreachable" or "failed"


_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS",
             "RESOURCE_DOES_NOT_EXIST", "RESOURCE_LIMIT_EXCEEDED"}


def classify(e: BaseException) -> tuple[str, str]:
    """What an error of MLflow's client or store means: ("unreachable" | "rejected" | "failed", reason).
    unreachable: no answer (connection refused, timeout, a SQLite file that cannot be opened); rejected: the
    store answered that this request is not acceptable (a name, a value, a state); failed: the store answered
    with an error of its own (a damaged database, an internal error)."""
    if isinstance(e, StoreFailure):
        return e.kind, str(e)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    chain, cause = [], e
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(c).__name__ for c in chain}
    if names & {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "MaxRetryError",
                "NewConnectionError"} or re.match(r"API request to \S+ failed with", text):
        return "unreachable", text
    if "unable to open database file" in text or "database is locked" in text:
        return "unreachable", text
    code = getattr(e, "error_code", None)
    if code in _REJECTED:
        return "rejected", text
    if type(e).__module__.startswith(("mlflow", "sqlalchemy", "sqlite3")):
        return "failed", f"{type(e).__name__}: {text}"
    return "rejected", f"{type(e).__name__}: {text}"  # the record itself: a field of the wrong shape


@dataclass
class LogResult:
    """What one logging call did: every record is logged now, already there, rejected, or left unlogged."""

    uri: str = ""
    records: int = 0  # distinct records asked for
    created: int = 0  # runs logged now (and kept)
    present: int = 0  # records whose run was already complete in the store
    replaced: int = 0  # runs left incomplete by an earlier logger, deleted and logged again
    duplicates: int = 0  # runs of a record logged at the same time by another logger, deleted
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (record name and id, the store's reason)
    pending: list[str] = field(default_factory=list)  # records another live logger had not finished
    unreachable: str | None = None  # why the store could not be reached
    failed: str | None = None  # why the store failed as a whole

    @property
    def not_logged(self) -> int:
        return self.records - self.created - self.present

    @property
    def ok(self) -> bool:
        return self.not_logged == 0 and not self.rejected and self.unreachable is None and self.failed is None

    def summary(self) -> str:
        done = f"{self.created} logged now, {self.present} already in MLflow"
        extra = [f"{n} {what}" for n, what in ((self.replaced, "unfinished run(s) of an earlier logger replaced"),
                                               (self.duplicates, "duplicate run(s) of a logger at the same time "
                                                                 "deleted")) if n]
        out = f"{self.records} record(s): {done}" + (f" ({'; '.join(extra)})" if extra else "")
        if self.rejected:
            out += f"; {len(self.rejected)} rejected by the store"
        if self.pending:
            out += f"; {len(self.pending)} still being logged by another process"
        if self.unreachable:
            out += f"; the store cannot be reached ({self.unreachable})"
        if self.failed:
            out += f"; the store failed ({self.failed})"
        if not self.ok:
            out += f"; {self.not_logged} not logged"
        return out


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Loggers on one host take turns with a store: two that create a SQLite store at once would run its schema
    migrations over each other, and two that log the same records through a server at once would both create
    their runs. A SQLite store's lock lies beside it (hosts that share its folder take turns too); a server's in
    the host's lock folder."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
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


def _me() -> str:
    return f"{socket.gethostname()}:{boot_id()}:{os.getpid()}"


def _complete(run) -> bool:
    """Whether a run holds all of its record: its logger finished it (a run marked failed by its logger is not)."""
    return run.info.status in ("FINISHED", "FAILED") and run.data.tags.get(TAG_LOGGED) != "false"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_progress(run) -> bool:
    """An unfinished run that a live logger is still writing (so it must not be replaced): one of this host whose
    process is alive, or one of another host made less than STALE_S ago."""
    if _complete(run):
        return False
    owner = run.data.tags.get(TAG_LOGGER, "")
    host, _, rest = owner.partition(":")
    boot, _, pid = rest.partition(":")
    if boot == boot_id():
        return pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))
    if not owner:
        return False  # made by a logger before this one: it finishes what it starts, so it died
    return time.time() - run.info.start_time / 1000 < STALE_S


def _order(run) -> tuple:
    """Which of two runs of one record is kept: the first made (the same answer in every process)."""
    return (run.info.start_time or 0, run.info.run_id)


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
    """MLflow keeps one database engine per URI for the life of the process, its connections open on the file they
    opened: once that file is replaced, a new engine must read the new one."""
    with suppress(Exception):  # MLflow's internals: without them, only the replaced file stays open a while
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


def prepare_sqlite(db: Path) -> None:
    """A SQLite store is made whole or not at all: its tables are created under a temporary name, which is then
    renamed into place (a process killed while creating it leaves only the temporary file, removed next time).
    A store that an older logger's kill left half-made cannot be opened: when it holds no runs it is moved aside
    (mlflow.db.broken-<time>) and made anew; when it holds runs it is left alone and reported. Runs under the
    store's lock."""
    for stale in db.parent.glob(f".{db.name}.creating-*"):
        stale.unlink(missing_ok=True)
    if db.exists():
        try:
            _open_sqlite(f"sqlite:///{db}")  # MLflow keeps the store it opened for this process
            return
        except Exception as e:  # noqa: BLE001 - any failure to open it is judged below
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            _forget_engine(f"sqlite:///{db}")
        if _holds_runs(db):
            raise StoreFailure("failed", f"the SQLite store {db} cannot be opened ({problem}); it holds runs, so "
                                         "it was left as it is: back it up, then try `mlflow db upgrade "
                                         f"sqlite:///{db}`, or move it aside to start a new store")
        aside = db.with_name(f"{db.name}.broken-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("-journal", "-wal", "-shm", ""):  # its journal too: left here, SQLite would replay it on
            if db.with_name(db.name + suffix).exists():  # the new store
                os.replace(db.with_name(db.name + suffix), aside.with_name(aside.name + suffix))
        log.warning("the SQLite store %s could not be opened (%s), probably left half-made by a process killed "
                    "while creating it; it held no runs and was moved to %s; making a new one", db, problem,
                    aside.name)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    log.info("creating the MLflow store %s", db)
    try:
        _open_sqlite(f"sqlite:///{tmp}")
        _forget_engine(f"sqlite:///{tmp}")
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def _log_quality_inputs(client, run_id: str, r: Record) -> None:
    """The evaluation data as the run's dataset input, and its per-sample outputs as a table."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {k: r.point.get(k) for k in ("n_items", "tokens_digest", "tokens_window", "tokens_stride")}
    dataset = Dataset(name="inferlab-evaluation", digest=str(r.point.get("items_digest", ""))[:36],
                      source_type="local", source=json.dumps({"path": r.config.get("evaluate", {}).get(
                          "dataset", {}).get("path", "data/eval")}), profile=json.dumps(profile))
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")])])
    path = project_root() / r.artifacts.get("outputs", "")
    if r.artifacts.get("outputs") and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keys = ("item_id", "task", "prompt_tokens", "output_tokens", "answer", "reference")
        client.log_table(run_id, {k: [row.get(k) for row in rows] for k in keys}, "outputs.json")


class Tracker:
    """Logs records to one MLflow tracking store."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)

    def _client(self):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # don't hang for minutes on a dead server
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(self.cfg.timeout_s, 1) * 4)))
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line (and a request) per run
        from mlflow import MlflowClient

        if self.uri.startswith("sqlite:///"):
            prepare_sqlite(Path(self.uri[len("sqlite:///"):]))
        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client) -> str:
        """The experiment's id, made if needed, and of the kind whose UI opens on its runs (an experiment made
        before without the kind gets it)."""
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND_RUNS)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside it
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(self.cfg.experiment, artifact_location=location,
                                            tags={KIND_TAG: KIND_RUNS})
        except Exception:  # another logger made it just now
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def log(self, records: Iterable[Record]) -> LogResult:
        """Log the records not yet in the store. Never raises: what was not logged is in the result and said in
        the log; the records stay on disk for `inferlab log-records`."""
        unique = list({r.record_id: r for r in records}.values())
        result = LogResult(uri=self.uri, records=len(unique))
        if not self.cfg.enabled or not unique:
            return result
        problem = check_reachable(self.uri, self.cfg.timeout_s)
        if problem is None:
            try:
                with store_lock(self.uri):
                    self._log(unique, result)
            except Exception as e:  # the store as a whole; the stage's files are safe either way
                kind, why = classify(e)
                if kind == "unreachable":
                    result.unreachable = why
                else:
                    result.failed = why
        else:
            result.unreachable = problem
        if result.unreachable:
            log.warning("MLflow tracking store %s cannot be reached (%s). The results are safe in the record files; "
                        "log them when the store is back with: inferlab log-records", self.uri, result.unreachable)
        elif result.failed:
            log.warning("MLflow tracking store %s failed (%s). The results are safe in the record files; log them "
                        "once it is repaired with: inferlab log-records", self.uri, result.failed)
        for name, why in result.rejected[:10]:
            log.warning("record %s not logged, rejected: %s", name, why)
        (log.info if result.ok else log.warning)("MLflow at %s (experiment %s): %s", self.uri, self.cfg.experiment,
                                                 result.summary())
        return result

    def _sweep_runs(self, client, exp_id: str, sweep_id: str) -> list:
        runs, token = [], None
        while True:
            page = client.search_runs([exp_id], filter_string=f"tags.`{TAG_SWEEP}` = {_quoted(sweep_id)}",
                                      max_results=5000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log(self, records: list[Record], result: LogResult) -> None:
        client = self._client()
        exp_id = self._experiment_id(client)
        by_sweep: dict[str, list[Record]] = {}
        for r in records:
            by_sweep.setdefault(r.sweep_id or "unknown", []).append(r)
        for sweep_id, recs in by_sweep.items():
            mine: set[str] = set()  # runs this logger made
            pending: set[str] = set()  # records a live logger elsewhere is writing
            runs = self._sweep_runs(client, exp_id, sweep_id)
            try:
                parent_id = self._parent(client, exp_id, sweep_id, recs, runs)
            except Exception as e:
                kind, why = classify(e)
                if kind != "rejected":
                    raise
                result.rejected.extend((f"{r.name} ({r.record_id})", f"its sweep's run: {why}") for r in recs)
                continue
            for r in recs:
                existing = [x for x in runs if x.data.tags.get(TAG_RECORD) == r.record_id]
                if any(_complete(x) for x in existing):
                    result.present += 1
                    for x in existing:  # an older logger marked a skipped point FAILED
                        if _complete(x) and x.info.status != RUN_STATUS[r.status]:
                            client.set_terminated(x.info.run_id, RUN_STATUS[r.status], end_time=x.info.end_time)
                    continue
                if any(_in_progress(x) for x in existing):
                    pending.add(r.record_id)
                    continue
                for x in existing:  # left unfinished by a logger that died or could not finish it
                    client.delete_run(x.info.run_id)
                    result.replaced += 1
                try:
                    mine.add(self._log_record(client, exp_id, parent_id, sweep_id, r))
                    result.created += 1
                except Exception as e:
                    kind, why = classify(e)
                    if kind != "rejected":
                        raise
                    result.rejected.append((f"{r.name} ({r.record_id})", why))
            self._settle(client, exp_id, sweep_id, mine, pending, result)

    def _parent(self, client, exp_id: str, sweep_id: str, recs: list[Record], runs: list) -> str:
        first = recs[0]
        spans = [r.span_ms() for r in recs]  # the sweep's run spans its measurements
        parents = sorted((r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"), key=_order)
        done = [r for r in parents if _complete(r) or _in_progress(r)]
        if done:
            return done[0].info.run_id
        if parents:  # made by a logger that died before finishing it: finish it
            run_id = parents[0].info.run_id
        else:
            run_id = client.create_run(
                exp_id,
                start_time=min(s for s, _ in spans),
                run_name=f"{first.stage}-{first.model.get('name')}-{sweep_id[-6:]}",
                tags={
                    TAG_SWEEP: sweep_id, TAG_KIND: "sweep", TAG_LOGGER: _me(), "inferlab.stage": first.stage,
                    "inferlab.model": str(first.model.get("name")),
                    "inferlab.hardware": str(first.environment.get("hardware", {}).get("id")),
                    "mlflow.source.git.commit": str(first.environment.get("git", {}).get("commit")),
                },
            ).info.run_id
        self._finish(client, run_id, "FINISHED", lambda: client.log_dict(run_id, first.environment,
                                                                         "environment.json"),
                     end_time=max(e for _, e in spans))
        return run_id

    @staticmethod
    def _finish(client, run_id: str, status: str, work, end_time: int | None = None) -> None:
        """Do `work` on a run, then end it with `status` (at `end_time`, epoch ms); if anything fails, the run is
        marked failed (and as unfinished, so the next logger replaces it) before the error goes on."""
        try:
            work()
            client.set_terminated(run_id, status, end_time=end_time)
        except BaseException:
            with suppress(Exception):
                client.set_tag(run_id, TAG_LOGGED, "false")
                client.set_terminated(run_id, "FAILED")
            raise

    def _log_record(self, client, exp_id: str, parent_id: str, sweep_id: str, r: Record) -> str:
        from mlflow.entities import Metric, Param

        metrics = [Metric(k, v, 0, 0) for k, v in _metrics(r).items()]  # a malformed record fails here,
        params = [Param(k, v) for k, v in _params(r).items()]  # before any run is made
        tags = {
            TAG_RECORD: r.record_id, TAG_SWEEP: sweep_id, TAG_KIND: "point", "mlflow.parentRunId": parent_id,
            TAG_LOGGER: _me(), "inferlab.stage": r.stage, "inferlab.model": str(r.model.get("name")),
            "inferlab.weights": str(r.model.get("weights")), "inferlab.status": r.status,
            "inferlab.point_id": r.point_id, "inferlab.hardware": str(r.environment.get("hardware", {}).get("id")),
            "mlflow.source.git.commit": str(r.environment.get("git", {}).get("commit")),
        }
        if r.reason:
            tags["inferlab.reason"] = r.reason[:5000]
            tags[TAG_NOTE] = f"{r.status}: {r.reason[:5000]}"
        start, end = r.span_ms()
        run_id = client.create_run(exp_id, run_name=r.name, tags=tags, start_time=start).info.run_id

        def work() -> None:
            client.log_batch(run_id, metrics=metrics, params=params)
            client.log_dict(run_id, r.to_dict(), "record.json")
            if r.point.get("scenario") == "quality":
                _log_quality_inputs(client, run_id, r)

        self._finish(client, run_id, RUN_STATUS[r.status], work, end_time=end)
        return run_id

    def _settle(self, client, exp_id: str, sweep_id: str, mine: set[str], pending: set[str],
                result: LogResult) -> None:
        """After this logger's runs of a sweep: keep one parent and one complete run per record (the first made;
        another logger at the same time may have made others), and wait a while for records that a live logger
        elsewhere was writing. Whichever logger settles last sees every run, so one of each remains."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            runs = self._sweep_runs(client, exp_id, sweep_id)
            # a record this logger logged that a live logger elsewhere is logging too: decide once both runs are
            # complete, so both loggers keep the same one (deciding earlier, each could keep its own and say so)
            mine_records = {r.data.tags.get(TAG_RECORD) for r in runs if r.info.run_id in mine}
            racing = [r for r in runs if r.data.tags.get(TAG_KIND) == "point" and r.info.run_id not in mine
                      and r.data.tags.get(TAG_RECORD) in mine_records and _in_progress(r)]
            if racing and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            parents = sorted((r for r in runs if r.data.tags.get(TAG_KIND) == "sweep" and _complete(r)), key=_order)
            if parents:
                keep = parents[0].info.run_id
                for r in runs:
                    if r.data.tags.get(TAG_KIND) == "point" and r.data.tags.get("mlflow.parentRunId") != keep:
                        client.set_tag(r.info.run_id, "mlflow.parentRunId", keep)
                for extra in parents[1:]:
                    with suppress(Exception):  # another logger may have deleted it already
                        client.delete_run(extra.info.run_id)
            by_record: dict[str, list] = {}
            for r in runs:
                if r.data.tags.get(TAG_KIND) == "point" and _complete(r):
                    by_record.setdefault(r.data.tags.get(TAG_RECORD), []).append(r)
            kept = set()
            for same in by_record.values():
                first, *extras = sorted(same, key=_order)
                kept.add(first.info.run_id)
                for extra in extras:
                    with suppress(Exception):
                        client.delete_run(extra.info.run_id)
            for run_id in mine - kept:  # this logger's run lost to another's, made first: the record is there once
                mine.discard(run_id)
                result.created -= 1
                result.present += 1
                result.duplicates += 1
            done = {rid for rid in pending if rid in by_record}
            result.present += len(done)
            pending -= done
            if not pending or time.monotonic() > deadline:
                result.pending.extend(sorted(pending))
                return
            time.sleep(1.0)

    def log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path],
                   figures: list[Path], digest: str, description: str = "") -> str | None:
        """One run per distinct report, with the report files and figures as artifacts; None if not logged.
        Never raises (the report on disk is what counts)."""
        if not self.cfg.enabled:
            return None
        problem, kind = check_reachable(self.uri, self.cfg.timeout_s), "unreachable"
        if problem is None:
            try:
                with store_lock(self.uri):
                    return self._log_report(run_name, params, metrics, files, figures, digest, description)
            except Exception as e:
                kind, problem = classify(e)
        said = {"unreachable": "cannot be reached", "rejected": "rejected the report run", "failed": "failed"}
        log.warning("MLflow tracking store %s %s (%s); the report is on disk, not logged", self.uri, said[kind],
                    problem)
        return None

    def _log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path],
                    figures: list[Path], digest: str, description: str) -> str:
        from mlflow.entities import Metric, Param

        client = self._client()
        exp_id = self._experiment_id(client)
        existing = client.search_runs([exp_id], filter_string=f"tags.`inferlab.report_digest` = {_quoted(digest)}")
        done = sorted((r for r in existing if _complete(r)), key=_order)
        if done:
            log.info("this report is already in MLflow (run %s)", done[0].info.run_id)
            return done[0].info.run_id
        for r in existing:  # left unfinished by a report killed while logging
            client.delete_run(r.info.run_id)
        tags = {TAG_KIND: "report", "inferlab.report_digest": digest, "inferlab.stage": "report", TAG_LOGGER: _me(),
                **({TAG_NOTE: description} if description else {})}
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        rid = run.info.run_id

        def work() -> None:
            client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in _allowed_names(metrics).items()],
                             params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in _allowed_names(params).items()])
            for f in files:
                client.log_artifact(rid, str(f))
            for f in figures:
                client.log_artifact(rid, str(f), artifact_path="figures")

        self._finish(client, rid, "FINISHED", work)
        log.info("report logged to MLflow at %s: run %s (%s)", self.uri, run_name, rid)
        return rid
