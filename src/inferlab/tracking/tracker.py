"""Logging records to MLflow: a parent run per sweep, a child run per record, a run per report.

A run's start and end are the measurement's own (the UI's Duration is the point's); a quality
run holds its evaluation data as a dataset input and its per-sample outputs as a table. When
things fail:
- a record the store rejects is reported with the store's reason; the others are still logged;
- an unreachable store (or one failing as a whole) is told apart from one rejecting a record;
- a logger killed midway leaves its runs finished or marked failed (`inferlab.logged` = false),
  and the next logger replaces them;
- two loggers at once take turns on one host (a lock per store); across hosts, the runs made for
  one record are found when each has finished, and all but the first are deleted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from inferlab.config import TrackingConfig, project_root
from inferlab.records import Record
from inferlab.tracking.names import (
    KIND_RUNS,
    KIND_TAG,
    MAX_PARAM_LEN,
    RUN_STATUS,
    TAG_KIND,
    TAG_LOGGED,
    TAG_LOGGER,
    TAG_NOTE,
    TAG_RECORD,
    TAG_SWEEP,
    allowed_names,
    quoted,
    run_metrics,
    run_params,
)
from inferlab.tracking.result import LogResult
from inferlab.tracking.runs import complete, in_progress, kept_first, logger_id
from inferlab.tracking.store import (
    SQLITE,
    check_reachable,
    classify,
    open_client,
    store_lock,
    tracking_uri,
)

log = logging.getLogger(__name__)

PENDING_WAIT_S = 60  # how long to wait for a record that a live logger elsewhere is logging
_REPORT_DIGEST = "inferlab.report_digest"


def _log_quality_inputs(client, run_id: str, r: Record) -> None:
    """The evaluation data as the run's dataset input, and its per-sample outputs as a table."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {k: r.point.get(k) for k in ("n_items", "tokens_digest", "tokens_window",
                                           "tokens_stride")}
    data_path = r.config.get("evaluate", {}).get("dataset", {}).get("path", "data/eval")
    dataset = Dataset(name="inferlab-evaluation", digest=str(r.point.get("items_digest", ""))[:36],
                      source_type="local", source=json.dumps({"path": data_path}),
                      profile=json.dumps(profile))
    client.log_inputs(run_id, [DatasetInput(dataset,
                                            [InputTag("mlflow.data.context", "evaluation")])])
    path = project_root() / r.artifacts.get("outputs", "")
    if r.artifacts.get("outputs") and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        keys = ("item_id", "task", "prompt_tokens", "output_tokens", "answer", "reference")
        client.log_table(run_id, {k: [row.get(k) for row in rows] for k in keys}, "outputs.json")


def _finish(client, run_id: str, status: str, work, end_time: int | None = None) -> None:
    """Do `work` on a run, then end it with `status` (at `end_time`, epoch ms).

    If anything fails, the run is marked failed and unfinished (the next logger replaces it)."""
    try:
        work()
        client.set_terminated(run_id, status, end_time=end_time)
    except BaseException:
        with suppress(Exception):
            client.set_tag(run_id, TAG_LOGGED, "false")
            client.set_terminated(run_id, "FAILED")
        raise


def _common_tags(r: Record) -> dict[str, str]:
    return {TAG_LOGGER: logger_id(), "inferlab.stage": r.stage,
            "inferlab.model": str(r.model.get("name")),
            "inferlab.hardware": str(r.environment.get("hardware", {}).get("id")),
            "mlflow.source.git.commit": str(r.environment.get("git", {}).get("commit"))}


class Tracker:
    """Logs records to one MLflow tracking store."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)

    def _client(self):
        return open_client(self.uri, self.cfg.timeout_s)

    def _experiment_id(self, client) -> str:
        """The experiment's id, made if needed, of the kind whose UI opens on its runs."""
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if KIND_TAG not in exp.tags:  # made before without the kind
                client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND_RUNS)
            return exp.experiment_id
        location = None
        if self.uri.startswith(SQLITE):  # a local store keeps its artifacts beside it
            location = (Path(self.uri[len(SQLITE):]).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(self.cfg.experiment, artifact_location=location,
                                            tags={KIND_TAG: KIND_RUNS})
        except Exception:  # another logger made it just now
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def log(self, records: Iterable[Record]) -> LogResult:
        """Log the records not yet in the store.

        Never raises: what was not logged is in the result and the log; the records stay on disk
        for `inferlab log-records`."""
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
            log.warning("MLflow tracking store %s cannot be reached (%s). The results are safe "
                        "in the record files; log them when the store is back with: inferlab "
                        "log-records",
                        self.uri, result.unreachable)
        elif result.failed:
            log.warning("MLflow tracking store %s failed (%s). The results are safe in the "
                        "record files; log them once it is repaired with: inferlab log-records",
                        self.uri, result.failed)
        for name, why in result.rejected[:10]:
            log.warning("record %s not logged, rejected: %s", name, why)
        (log.info if result.ok else log.warning)("MLflow at %s (experiment %s): %s", self.uri,
                                                 self.cfg.experiment, result.summary())
        return result

    def _sweep_runs(self, client, exp_id: str, sweep_id: str) -> list:
        runs, token = [], None
        while True:
            page = client.search_runs([exp_id],
                                      filter_string=f"tags.`{TAG_SWEEP}` = {quoted(sweep_id)}",
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
                result.rejected.extend((f"{r.name} ({r.record_id})", f"its sweep's run: {why}")
                                       for r in recs)
                continue
            for r in recs:
                existing = [x for x in runs if x.data.tags.get(TAG_RECORD) == r.record_id]
                if any(complete(x) for x in existing):
                    result.present += 1
                    for x in existing:  # an older logger marked a skipped point FAILED
                        if complete(x) and x.info.status != RUN_STATUS[r.status]:
                            client.set_terminated(x.info.run_id, RUN_STATUS[r.status],
                                                  end_time=x.info.end_time)
                    continue
                if any(in_progress(x) for x in existing):
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
        parents = sorted((r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"), key=kept_first)
        done = [r for r in parents if complete(r) or in_progress(r)]
        if done:
            return done[0].info.run_id
        if parents:  # made by a logger that died before finishing it: finish it
            run_id = parents[0].info.run_id
        else:
            run_id = client.create_run(
                exp_id,
                start_time=min(s for s, _ in spans),
                run_name=f"{first.stage}-{first.model.get('name')}-{sweep_id[-6:]}",
                tags={TAG_SWEEP: sweep_id, TAG_KIND: "sweep", **_common_tags(first)},
            ).info.run_id
        _finish(client, run_id, "FINISHED",
                lambda: client.log_dict(run_id, first.environment, "environment.json"),
                end_time=max(e for _, e in spans))
        return run_id

    def _log_record(self, client, exp_id: str, parent_id: str, sweep_id: str, r: Record) -> str:
        from mlflow.entities import Metric, Param

        # a malformed record fails here, before any run is made
        metrics = [Metric(k, v, 0, 0) for k, v in run_metrics(r).items()]
        params = [Param(k, v) for k, v in run_params(r).items()]
        tags = {
            TAG_RECORD: r.record_id, TAG_SWEEP: sweep_id, TAG_KIND: "point",
            "mlflow.parentRunId": parent_id,
            **_common_tags(r), "inferlab.weights": str(r.model.get("weights")),
            "inferlab.status": r.status, "inferlab.point_id": r.point_id,
        }
        if r.reason:
            tags["inferlab.reason"] = r.reason[:5000]
            tags[TAG_NOTE] = f"{r.status}: {r.reason[:5000]}"
        start, end = r.span_ms()
        run_id = client.create_run(exp_id, run_name=r.name, tags=tags,
                                   start_time=start).info.run_id

        def work() -> None:
            client.log_batch(run_id, metrics=metrics, params=params)
            client.log_dict(run_id, r.to_dict(), "record.json")
            if r.point.get("scenario") == "quality":
                _log_quality_inputs(client, run_id, r)

        _finish(client, run_id, RUN_STATUS[r.status], work, end_time=end)
        return run_id

    def _settle(self, client, exp_id: str, sweep_id: str, mine: set[str], pending: set[str],
                result: LogResult) -> None:
        """After this logger's runs: keep one parent and one complete run per record (the first).

        Waits a while for records a live logger elsewhere was writing. Whichever logger settles
        last sees every run, so one of each remains."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            runs = self._sweep_runs(client, exp_id, sweep_id)
            # a record another live logger logs too: decide once both runs are complete, so both
            # loggers keep the same one (deciding earlier, each could keep its own and say so)
            mine_records = {r.data.tags.get(TAG_RECORD) for r in runs if r.info.run_id in mine}
            racing = [r for r in runs if r.data.tags.get(TAG_KIND) == "point"
                      and r.info.run_id not in mine
                      and r.data.tags.get(TAG_RECORD) in mine_records and in_progress(r)]
            if racing and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            parents = sorted((r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"
                              and complete(r)),
                             key=kept_first)
            if parents:
                keep = parents[0].info.run_id
                for r in runs:
                    tags = r.data.tags
                    if tags.get(TAG_KIND) == "point" and tags.get("mlflow.parentRunId") != keep:
                        client.set_tag(r.info.run_id, "mlflow.parentRunId", keep)
                for extra in parents[1:]:
                    with suppress(Exception):  # another logger may have deleted it already
                        client.delete_run(extra.info.run_id)
            by_record: dict[str, list] = {}
            for r in runs:
                if r.data.tags.get(TAG_KIND) == "point" and complete(r):
                    by_record.setdefault(r.data.tags.get(TAG_RECORD), []).append(r)
            kept = set()
            for same in by_record.values():
                first, *extras = sorted(same, key=kept_first)
                kept.add(first.info.run_id)
                for extra in extras:
                    with suppress(Exception):
                        client.delete_run(extra.info.run_id)
            # lost to another's run, made first: the record is there once
            for run_id in mine - kept:
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

    def log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float],
                   files: list[Path],
                   figures: list[Path], digest: str, description: str = "") -> str | None:
        """One run per distinct report, its files and figures as artifacts; None if not logged.

        Never raises (the report on disk is what counts)."""
        if not self.cfg.enabled:
            return None
        problem, kind = check_reachable(self.uri, self.cfg.timeout_s), "unreachable"
        if problem is None:
            try:
                with store_lock(self.uri):
                    return self._log_report(run_name, params, metrics, files, figures, digest,
                                            description)
            except Exception as e:
                kind, problem = classify(e)
        said = {"unreachable": "cannot be reached", "rejected": "rejected the report run",
                "failed": "failed"}
        log.warning("MLflow tracking store %s %s (%s); the report is on disk, not logged",
                    self.uri, said[kind], problem)
        return None

    def _log_report(self, run_name: str, params: dict[str, Any], metrics: dict[str, float],
                    files: list[Path],
                    figures: list[Path], digest: str, description: str) -> str:
        from mlflow.entities import Metric, Param

        client = self._client()
        exp_id = self._experiment_id(client)
        existing = client.search_runs([exp_id],
                                      filter_string=f"tags.`{_REPORT_DIGEST}` = {quoted(digest)}")
        done = sorted((r for r in existing if complete(r)), key=kept_first)
        if done:
            log.info("this report is already in MLflow (run %s)", done[0].info.run_id)
            return done[0].info.run_id
        for r in existing:  # left unfinished by a report killed while logging
            client.delete_run(r.info.run_id)
        tags = {TAG_KIND: "report", _REPORT_DIGEST: digest, "inferlab.stage": "report",
                TAG_LOGGER: logger_id(), **({TAG_NOTE: description} if description else {})}
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        rid = run.info.run_id

        def work() -> None:
            metric_list = [Metric(k, v, 0, 0) for k, v in allowed_names(metrics).items()]
            param_list = [Param(k, str(v)[:MAX_PARAM_LEN])
                          for k, v in allowed_names(params).items()]
            client.log_batch(rid, metrics=metric_list, params=param_list)
            for f in files:
                client.log_artifact(rid, str(f))
            for f in figures:
                client.log_artifact(rid, str(f), artifact_path="figures")

        _finish(client, rid, "FINISHED", work)
        log.info("report logged to MLflow at %s: run %s (%s)", self.uri, run_name, rid)
        return rid
