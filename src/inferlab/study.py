"""What every stage execution shares: its sweep id, where its records go, and logging them to MLflow."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.config import StudyConfig, project_root, resolve, to_container
from inferlab.environment import environment
from inferlab.models.acquire import read_provenance
from inferlab.tracking import Tracker

log = logging.getLogger(__name__)


def records_path(cfg: StudyConfig, stage: str, hardware_id: str) -> Path:
    """Records of one stage on one machine: results of different hardware never overwrite each other."""
    return resolve(cfg.paths.results) / stage / f"{hardware_id}.jsonl"


def model_info(cfg: StudyConfig) -> dict[str, Any]:
    prov = read_provenance(cfg.model_dir() / "hf")
    return {
        "name": cfg.model.name,
        "id": cfg.model.repo_id or cfg.model.name,
        "revision": prov.get("revision", cfg.model.revision),
        "weights": cfg.model.weights,
        "source": cfg.model.source,
        **({"note": cfg.model.note} if cfg.model.note else {}),
        **({"derived_from": prov["derived_from"]} if prov.get("derived_from") else {}),  # e.g. a dequantized GGUF
    }


def relpath(path: Path) -> str:
    try:
        return path.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


def multirun_sweep_id(stage: str) -> str | None:
    """Jobs of one Hydra multirun share its sweep folder: they share one sweep id (one MLflow parent run)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not running under Hydra (DVC's --params path)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    digest = hashlib.sha256(str(Path(hc.sweep.dir).resolve()).encode()).hexdigest()[:8]
    return f"{stage}-multirun-{Path(hc.sweep.dir).name}-{digest}"


class StorageError(RuntimeError):
    """Results cannot be written (a folder not writable, a full disk): found before any work starts."""


def check_storage(cfg: StudyConfig) -> None:
    """Every folder a stage writes is writable and has paths.min_free_mb free; else a clear error, now."""
    need = cfg.paths.min_free_mb * 2**20
    for key in ("results", "metrics"):
        folder = resolve(getattr(cfg.paths, key))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StorageError(f"paths.{key}: {folder} is not writable ({e.strerror or e}); nothing was run. "
                               f"Fix its permissions or point paths.{key} elsewhere") from None
        free = shutil.disk_usage(folder).free
        if free < need:
            raise StorageError(f"paths.{key}: only {free / 2**20:,.0f} MiB free on the disk of {folder}; a stage "
                               f"needs at least {cfg.paths.min_free_mb:,} MiB (paths.min_free_mb); nothing was run")


class StageRun:
    """One execution of a stage: records appended as they are made, logged to MLflow at the end."""

    def __init__(self, cfg: StudyConfig, stage: str, sections: Sequence[str]):
        check_storage(cfg)
        self.cfg = cfg
        self.stage = stage
        self.sweep_id = multirun_sweep_id(stage) or rec.new_sweep_id(stage)
        self.env = environment()
        full = to_container(cfg)
        self.config = {s: full[s] for s in sections}
        self.model = model_info(cfg)
        self.path = records_path(cfg, stage, self.env["hardware"]["id"])
        self.records: list[rec.Record] = []  # this run's records (and a resumed sweep's earlier ones)
        self.written = 0
        self._since = rec.now_ms()  # the start of the work the next record describes, unless it says otherwise

    def record(self, name: str, point: dict[str, Any], **fields: Any) -> rec.Record:
        """Append one record. `started` (when its measurement began, ms) defaults to the end of the previous
        record of this run, or the run's start: the work between two records is the later one's."""
        fields.setdefault("started", self._since)
        r = rec.Record(
            stage=self.stage, name=name, point=point, config=self.config, model=self.model,
            environment=self.env, sweep_id=self.sweep_id, **fields,
        )
        self._since = r.ended
        rec.append(self.path, r)
        self.records.append(r)
        self.written += 1
        if r.status == "failed":
            log.warning("%s %s: failed (%s)", self.stage, name, r.reason)
        elif r.status == "skipped":  # an expected limitation of this machine, said once by the stage
            log.debug("%s %s: skipped (%s)", self.stage, name, r.reason)
        return r

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()  # records already written are logged even if the stage was interrupted

    def finish(self) -> None:
        earlier = len(self.records) - self.written
        log.info("%d record(s) appended to %s%s", self.written, relpath(self.path),
                 f" ({earlier} of this sweep were written before the interruption)" if earlier else "")
        Tracker(self.cfg.tracking).log(self.records)
