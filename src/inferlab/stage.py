"""A stage execution: how a stage script runs, and what every stage execution shares.

It runs from params.yaml (DVC) or by composing conf/ with Hydra (command line, multirun):

    python stages/convert.py --params params.yaml    # what dvc.yaml runs (DVC's composition)
    python stages/convert.py model=tiny-phi convert.quants=[q8_0]
    python stages/convert.py -m convert.quants=[q8_0],[q4_0]

Both paths validate the same way (inferlab.config.load) and hand the stage the same StudyConfig.
A stage runs in a `StageRun`: its sweep id, where its records go, and logging them to MLflow at
the end.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inferlab import records as rec
from inferlab import slurm
from inferlab.aggregate import aggregate_files
from inferlab.config import (
    ConfigError,
    StudyConfig,
    compose,
    conf_dir,
    load,
    project_root,
    recording,
    register_configs,
    resolve,
    to_container,
)
from inferlab.environment import environment
from inferlab.logs import quiet_libraries, setup_logging
from inferlab.models.provenance import read_provenance
from inferlab.tracking import Tracker

log = logging.getLogger(__name__)


def records_path(cfg: StudyConfig, stage: str, hardware_id: str) -> Path:
    """Records of one stage on one machine: those of other hardware are never overwritten."""
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
        # e.g. a dequantized GGUF, and which weights
        **({"derived_from": prov["derived_from"]} if prov.get("derived_from") else {}),
        **({"weights_sha256": prov["weights_sha256"]} if prov.get("weights_sha256") else {}),
    }


def relpath(path: Path) -> str:
    try:
        return path.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


def multirun_sweep_id(stage: str) -> str | None:
    """Jobs of one Hydra multirun share its sweep folder, so a sweep id (one MLflow parent run)."""
    run = multirun()
    return f"{stage}-multirun-{run.name}" if run else None


@dataclass
class Multirun:
    """The Hydra multirun this process runs a job of."""

    name: str  # its sweep folder's name and a digest of its path: one per multirun started
    # the multirun's own overrides (before the sweep is expanded): the same on a rerun
    overrides: list[str]
    jobs: int | None  # how many jobs it has; None when its sweeper is not Hydra's basic one


def multirun() -> Multirun | None:
    """The multirun of this Hydra job, or None outside one (a single run, DVC's --params path)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not running under Hydra
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    folder = Path(hc.sweep.dir).resolve()
    name = f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    overrides, jobs = list(hc.overrides.task), None
    # Hydra saves the multirun's own config (its unexpanded overrides) before its first job
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        saved = OmegaConf.load(folder / "multirun.yaml").hydra
        overrides = [*saved.overrides.task,
                     *(f"{k}={v}" for k, v in (saved.sweeper.get("params") or {}).items())]
        if str(saved.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            parsed = OverridesParser.create().parse_overrides(overrides)
            jobs = sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception as e:  # noqa: BLE001 - without it the multirun still runs, only not resumable
        log.warning("cannot read the multirun's overrides from %s (%s): an interrupted "
                    "multirun will not be resumed by a rerun", folder / "multirun.yaml", e)
    return Multirun(name, overrides, jobs)


class CannotStart(RuntimeError):
    """A stage that must not start (its storage, another process running the same sweep): found
    before any work, said in one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the stage and its workers stop at once; the records written are kept."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


class Stopped(RuntimeError):
    """A stage stopped part way, for a reason said in one line; the records written are kept."""


class StorageError(CannotStart):
    """Results cannot be written (a folder or file not writable, a full disk): found up front."""


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def _write_check(folder: Path) -> None:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def check_storage(cfg: StudyConfig, folders: Sequence[tuple[str, Path]] = (),
                  files: Sequence[tuple[str, Path]] = ()) -> None:
    """Every folder a stage writes (paths.results, paths.metrics and the stage's own `folders`)
    is writable and has paths.min_free_mb free, and every file it appends to or replaces
    (`files`: a records file, a report) can be written: not read-only, not immutable. Else a
    clear error, now, before any point is measured."""
    need = cfg.paths.min_free_mb * 2**20
    checks = [(f"paths.{key}", resolve(getattr(cfg.paths, key))) for key in ("results", "metrics")]
    for key, folder in [*checks, *folders]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_check(folder)
        except OSError as e:
            if e.errno in FULL_DISK:
                raise StorageError(f"{key}: the disk of {folder} is full ({e.strerror}); nothing "
                                   f"was run. Free space on it or point {key.split(' ')[0]} "
                                   "elsewhere") from None
            raise StorageError(f"{key}: {folder} is not writable ({e.strerror or e}); nothing "
                               f"was run. Fix its permissions or point {key.split(' ')[0]} "
                               "elsewhere") from None
        free = shutil.disk_usage(folder).free
        if free < need:
            raise StorageError(f"{key}: only {free / 2**20:,.0f} MiB free on the disk of "
                               f"{folder}; a stage needs at least {cfg.paths.min_free_mb:,} "
                               "MiB (paths.min_free_mb); nothing was run")
    for what, path in files:
        if not path.exists():
            continue  # its folder was checked above
        # opening for writing changes nothing, and fails as the write would (read-only, immutable)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise StorageError(f"{what} {path} cannot be written ({e.strerror or e}); nothing "
                               "was run. Make it writable again (chmod u+w, or chattr -i where "
                               "it was made immutable)") from None


class StageRun:
    """One execution of a stage: records appended as they are made, logged to MLflow at the end."""

    def __init__(self, cfg: StudyConfig, stage: str, sections: Sequence[str],
                 needs_model: bool = True):
        self.cfg = cfg
        self.stage = stage
        self.env = environment()
        self.path = records_path(cfg, stage, self.env["hardware"]["id"])
        check_storage(cfg, folders=[(f"paths.results ({stage} records)", self.path.parent)],
                      files=[("the records file", self.path),
                             *((f"the {stage} aggregate", p)
                               for p in aggregate_files(cfg, stage))])
        if needs_model and not cfg.model_dir().is_dir():
            raise CannotStart(f"paths.models: {cfg.model_dir()} does not exist "
                              f"(paths.models={cfg.paths.models!r}); nothing was run. Run the "
                              "download stage first (python stages/download.py "
                              f"model={cfg.model.name}), or point paths.models at the folder "
                              f"that holds {cfg.model.name}/")
        self.sweep_id = multirun_sweep_id(stage) or rec.new_sweep_id(stage)
        # the sections it reads, resolved
        self.config = {s: to_container(getattr(cfg, s)) for s in sections}
        self.model = model_info(cfg)
        # this run's records (and a resumed sweep's earlier ones)
        self.records: list[rec.Record] = []
        self.written = 0
        # the start of the work the next record describes, unless it says otherwise
        self._since = rec.now_ms()
        # after a stage that finished, its records logged
        self._when_finished: list[Callable[[], None]] = []
        self._on_close: list[Callable[[], None]] = [slurm.stop_on_sigterm()]  # always, at the end

    def record(self, name: str, point: dict[str, Any], **fields: Any) -> rec.Record:
        """Append one record.

        `started` (ms) defaults to the end of this run's previous record, or the run's start:
        the work between two records is the later one's."""
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
        elif r.status == "skipped":  # an expected limitation of this machine, said by the stage
            log.debug("%s %s: skipped (%s)", self.stage, name, r.reason)
        return r

    def add_environment(self, key: str, value: Any) -> None:
        """Say more about where this run measures (e.g. the GPU a job claimed), from now on."""
        self.env = {**self.env, key: value}

    def reread_model(self) -> None:
        """Read the model's description again (after the download stage resolved its revision)."""
        self.model = model_info(self.cfg)

    def resume(self, sweep_id: str, earlier: list[rec.Record]) -> None:
        """Continue an interrupted sweep: its id and records written (logged with the new ones)."""
        self.sweep_id = sweep_id
        self.records.extend(earlier)

    def when_finished(self, fn: Callable[[], None]) -> None:
        """Call fn once the stage has finished without an error and its records are logged."""
        self._when_finished.append(fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call fn at the end of the stage, however it ended."""
        self._on_close.append(fn)

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # records already written are logged even if the stage was interrupted
        self.finish(ok=exc_type is None)

    def finish(self, ok: bool = True) -> None:
        earlier = len(self.records) - self.written
        log.info("%d record(s) appended to %s%s", self.written, relpath(self.path),
                 f" ({earlier} of this sweep were written before the interruption)"
                 if earlier else "")
        try:
            Tracker(self.cfg.tracking).log(self.records)
            for fn in self._when_finished if ok else ():
                fn()
        finally:
            self._when_finished.clear()
            for fn in self._on_close:
                fn()
            self._on_close.clear()


# -- how a stage script runs ------------------------------------------------------------------

StageFn = Callable[..., object]
# a folder: each stage writes the config keys it read to <stage>.json there
READS_ENV = "INFERLAB_CONFIG_READS"


def _call(fn: StageFn, cfg) -> None:
    folder = os.environ.get(READS_ENV)
    if not folder:
        _run(fn, cfg)
        return
    # what dvc.yaml must list as the stage's params (tests/test_dependencies.py)
    with recording() as reads:
        try:
            _run(fn, cfg)
        finally:
            path = Path(folder) / f"{Path(inspect.getfile(fn)).stem}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sorted(reads), indent=1) + "\n")


def _run(fn: StageFn, cfg) -> None:
    # a SIGTERM (kill, Slurm, a timeout) stops the stage as Ctrl-C does
    saved = {signum: signal.signal(signum, _interrupt)
             for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        fn(cfg)
    except KeyboardInterrupt as e:
        name = e.args[0] if isinstance(e, Interrupted) else "SIGINT"
        log.error("interrupted by %s: the points measured so far are kept in the records; "
                  "rerun the same command to measure the rest", name)
        raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
    except CannotStart as e:
        log.error("cannot start: %s", e)
        raise SystemExit(f"cannot start: {e}") from None
    except (Stopped, rec.WriteError) as e:
        # the records written before it are kept; a rerun resumes the sweep
        log.error("stopped: %s", e)
        raise SystemExit(f"stopped: {e}") from None
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def run_stage(fn: StageFn, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--params"]:
        if len(argv) != 2:
            sys.exit("usage: stages/<name>.py --params params.yaml   "
                     "(or Hydra overrides: key=value ...)")
        setup_logging()
        path = Path(argv[1])
        try:
            cfg = load(yaml.safe_load(path.read_text()))
        except ConfigError as e:
            sys.exit(f"invalid configuration in {path}: {e}")
        _call(fn, cfg)
        return

    import hydra
    from omegaconf import DictConfig

    register_configs()
    if not any(a in ("-m", "--multirun") or a.startswith(("-", "hydra")) for a in argv):
        try:  # fail before Hydra starts a run folder, with the key, the value and what is allowed
            compose(argv)
        except ConfigError as e:
            sys.exit(f"invalid configuration: {e}")

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(dcfg: DictConfig) -> None:
        quiet_libraries()  # Hydra has configured logging by now
        try:
            cfg = load(dcfg)
        except ConfigError as e:
            log.error("invalid configuration: %s", e)
            raise SystemExit(f"invalid configuration: {e}") from None
        _call(fn, cfg)

    sys.argv = [sys.argv[0], *argv]
    _main()
