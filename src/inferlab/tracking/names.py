"""A run's tags, and a record's params and metrics under names MLflow accepts."""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

# GROUP_PARAMS: the settings runs are compared by
from inferlab.fields import GROUP_PARAMS, figures
from inferlab.records import Record

log = logging.getLogger(__name__)

TAG_RECORD = "inferlab.record_id"
TAG_SWEEP = "inferlab.sweep_id"
TAG_KIND = "inferlab.kind"
TAG_LOGGED = "inferlab.logged"  # "false": a run its logger could not finish (replaced next time)
TAG_LOGGER = "inferlab.logger"  # host:boot:pid of the process that made the run
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI
# without a kind, MLflow 3's UI opens an experiment on its GenAI overview; this kind opens its runs
KIND_TAG, KIND_RUNS = "mlflow.experimentKind", "custom_model_development"
RUN_STATUS = {"ok": "FINISHED", "skipped": "FINISHED", "failed": "FAILED"}  # skipped is no error
MAX_PARAM_LEN = 500
MAX_NAME_LEN = 250  # MLflow's limit for metric and param names

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. /:]")  # MLflow's names: alphanumerics, _ - . space : /
_renamed: set[str] = set()  # names already said to be rewritten (said once per process)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _digested(clean: str, original: str) -> str:
    return f"{clean[:MAX_NAME_LEN - 17]}-{hashlib.sha256(original.encode()).hexdigest()[:16]}"


def mlflow_name(name: str) -> str:
    """A name MLflow accepts, the same every time: bad characters become '_', the path parts
    '', '.', '..' are dropped or replaced, and past 250 characters it ends with a digest."""
    parts = _NOT_ALLOWED.sub("_", name).split("/")
    clean = "/".join("__" if part == ".." else part for part in parts if part not in ("", "."))
    if clean.startswith(".."):
        clean = "__" + clean[2:]
    clean = clean or "_"
    if len(clean) > MAX_NAME_LEN:
        clean = _digested(clean, name)
    return clean


def allowed_names(values: dict[str, Any]) -> dict[str, Any]:
    """The values under names MLflow accepts; a rewritten name that meets another gets a digest."""
    out = {k: v for k, v in values.items() if mlflow_name(k) == k}
    for k in sorted(set(values) - set(out)):
        new = mlflow_name(k)
        if new in out:
            new = mlflow_name(_digested(new, k))
        out[new] = values[k]
        if k not in _renamed:
            _renamed.add(k)
            log.info("MLflow does not accept the name %r: logged as %r (record.json keeps the "
                     "original)",
                     k, new)
    return out


def run_params(record: Record) -> dict[str, str]:
    flat = flatten({"model": record.model, **record.config})
    flat.update(flatten(record.point, "point."))
    flat.update({k: record.point[k] for k in GROUP_PARAMS
                 if record.point.get(k) not in (None, "")})
    flat["hardware"] = record.environment.get("hardware", {}).get("id")
    return allowed_names({k: str(v)[:MAX_PARAM_LEN] for k, v in flat.items()})


def run_metrics(record: Record) -> dict[str, float]:
    """The record's figures by its stage's field table (record.json keeps all it measured)."""
    out = {}
    for k, v in flatten(figures(record)).items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and v == v:  # drop NaN
            out[k] = float(v)
    return allowed_names(out)


def quoted(value: str) -> str:
    """A string literal for an MLflow filter."""
    return f"'{value}'" if "'" not in value else f'"{value}"'
