"""All MLflow logging goes through here, and always from records.

One parent run per stage execution (a sweep), one nested child run per record (a sweep point). Runs are
tagged with the record's id, so logging the same records twice creates no duplicates, and records written
while the tracking store was unreachable can be logged later with `inferlab log-records`. A run's start and
end are the measurement's own (so the UI's Duration is the point's), the evaluation data is the quality runs'
dataset input, and their per-sample outputs are a table artifact.
"""

from __future__ import annotations

import fcntl
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inferlab.config import TrackingConfig, project_root
from inferlab.records import Record

log = logging.getLogger(__name__)

TAG_RECORD = "inferlab.record_id"
TAG_SWEEP = "inferlab.sweep_id"
TAG_KIND = "inferlab.kind"
MAX_PARAM_LEN = 500


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


# settings the MLflow UI groups and compares runs by, as top-level params (also kept under point.*)
GROUP_PARAMS = ("runtime", "scenario", "precision", "batch_size", "kv_cache", "attn", "compile", "quant", "n_threads",
                "n_batch", "flash_attn", "kv_type", "api", "mode", "device", "prompt_tokens", "new_tokens")


def _params(record: Record) -> dict[str, str]:
    flat = flatten({"model": record.model, **record.config})
    flat.update(flatten(record.point, "point."))
    flat.update({k: record.point[k] for k in GROUP_PARAMS if record.point.get(k) not in (None, "")})
    flat["hardware"] = record.environment.get("hardware", {}).get("id")
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in flat.items()}


def _metrics(record: Record) -> dict[str, float]:
    out = {}
    for k, v in flatten(record.metrics).items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and v == v:  # drop NaN
            out[k] = float(v)
    return out


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Processes on one host take turns with a SQLite store: two that create it at once (queued DVC experiments
    started together) would run its schema migrations over each other and leave it broken."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside it
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return client.create_experiment(self.cfg.experiment, artifact_location=location)

    def log(self, records: Iterable[Record]) -> int:
        """Log records not yet in the store; returns how many child runs were created. Never raises: a store
        that cannot be reached is reported, and the records stay on disk for `inferlab log-records`."""
        records = list(records)
        if not self.cfg.enabled or not records:
            return 0
        problem = check_reachable(self.uri, self.cfg.timeout_s)
        if problem is None:
            try:
                with store_lock(self.uri):
                    return self._log(records)
            except Exception as e:  # any failure of the store must not lose the stage's files
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning(
            "MLflow tracking store %s cannot be reached (%s). The results are safe in the record files; "
            "log them when the store is back with: inferlab log-records", self.uri, problem,
        )
        return 0

    def _log(self, records: list[Record]) -> int:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client()
        exp_id = self._experiment_id(client)
        created = 0
        by_sweep: dict[str, list[Record]] = {}
        for r in records:
            by_sweep.setdefault(r.sweep_id or "unknown", []).append(r)
        for sweep_id, recs in by_sweep.items():
            existing = client.search_runs(
                [exp_id], filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}'", max_results=50000
            )
            parent = next((r for r in existing if r.data.tags.get(TAG_KIND) == "sweep"), None)
            done = {r.data.tags.get(TAG_RECORD) for r in existing}
            first = recs[0]
            if parent is None:
                spans = [r.span_ms() for r in recs]
                parent = client.create_run(
                    exp_id,
                    start_time=min(s for s, _ in spans),
                    run_name=f"{first.stage}-{first.model.get('name')}-{sweep_id[-6:]}",
                    tags={
                        TAG_SWEEP: sweep_id, TAG_KIND: "sweep", "inferlab.stage": first.stage,
                        "inferlab.model": str(first.model.get("name")),
                        "inferlab.hardware": str(first.environment.get("hardware", {}).get("id")),
                        "mlflow.source.git.commit": str(first.environment.get("git", {}).get("commit")),
                    },
                )
                client.log_dict(parent.info.run_id, first.environment, "environment.json")
                client.set_terminated(parent.info.run_id, "FINISHED", end_time=max(e for _, e in spans))
            parent_id = parent.info.run_id
            for r in recs:
                if r.record_id in done:
                    continue
                tags = {
                    TAG_RECORD: r.record_id, TAG_SWEEP: sweep_id, TAG_KIND: "point", "mlflow.parentRunId": parent_id,
                    "inferlab.stage": r.stage, "inferlab.model": str(r.model.get("name")),
                    "inferlab.weights": str(r.model.get("weights")), "inferlab.status": r.status,
                    "inferlab.point_id": r.point_id,
                    "inferlab.hardware": str(r.environment.get("hardware", {}).get("id")),
                    "mlflow.source.git.commit": str(r.environment.get("git", {}).get("commit")),
                }
                if r.reason:
                    tags["inferlab.reason"] = r.reason[:5000]
                start, end = r.span_ms()
                run = client.create_run(exp_id, run_name=r.name, tags=tags, start_time=start)
                rid = run.info.run_id
                client.log_batch(
                    rid,
                    metrics=[Metric(k, v, 0, 0) for k, v in _metrics(r).items()],
                    params=[Param(k, v) for k, v in _params(r).items()],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                )
                client.log_dict(rid, r.to_dict(), "record.json")
                if r.point.get("scenario") == "quality":
                    _log_quality_inputs(client, rid, r)
                client.set_terminated(rid, "FINISHED" if r.status == "ok" else "FAILED", end_time=end)
                created += 1
        log.info("logged %d new run(s) to MLflow at %s (experiment %s)", created, self.uri, self.cfg.experiment)
        return created

    def log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path],
                   figures: list[Path], digest: str) -> str | None:
        """One run per distinct report, with the report files and figures as artifacts; None if not logged.
        Never raises (the report on disk is what counts)."""
        if not self.cfg.enabled:
            return None
        problem = check_reachable(self.uri, self.cfg.timeout_s)
        if problem is None:
            try:
                with store_lock(self.uri):
                    return self._log_report(run_name, params, metrics, files, figures, digest)
            except Exception as e:
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("MLflow tracking store %s cannot be reached (%s); the report is on disk, not logged", self.uri,
                    problem)
        return None

    def _log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path],
                    figures: list[Path], digest: str) -> str:
        from mlflow.entities import Metric, Param

        client = self._client()
        exp_id = self._experiment_id(client)
        existing = client.search_runs([exp_id], filter_string=f"tags.`inferlab.report_digest` = '{digest}'")
        if existing:
            log.info("this report is already in MLflow (run %s)", existing[0].info.run_id)
            return existing[0].info.run_id
        run = client.create_run(exp_id, run_name=run_name, tags={TAG_KIND: "report", "inferlab.report_digest": digest,
                                                                 "inferlab.stage": "report"})
        rid = run.info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()])
        for f in files:
            client.log_artifact(rid, str(f))
        for f in figures:
            client.log_artifact(rid, str(f), artifact_path="figures")
        client.set_terminated(rid, "FINISHED")
        log.info("report logged to MLflow at %s: run %s (%s)", self.uri, run_name, rid)
        return rid
