"""One record schema for every measurement, appended as JSON lines; aggregates written atomically.

A record is self-describing: the stage and the point it measured, the resolved config it ran
with, the model (id, revision, weights kind), where it ran (libraries, hardware, git commit),
when, its status (ok, failed or skipped, with the reason), its metrics and its raw samples. Its
`point_id` is a hash of the stage and the resolved point config, so a rerun can tell which
points are finished and MLflow logging can skip duplicates.

Record files are `results/<stage>/<hardware>.jsonl`: one whole record per line, never rewritten,
only appended to (see `append`), so a line is either a whole record or the torn end of a writer
that died mid-write.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inferlab.config import TORCHAO_PRECISIONS

log = logging.getLogger(__name__)

# 2: started / ended (when the measurement ran, to the millisecond); 3: see upgrade()
SCHEMA_VERSION = 3
STATUSES = ("ok", "failed", "skipped")


def now() -> str:
    """UTC timestamp, to the second, as every record and manifest writes it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def now_ms() -> str:
    """UTC timestamp to the millisecond: when a measurement started and ended."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def epoch_ms(stamp: str) -> int:
    """Milliseconds since the epoch of a record's timestamp (as MLflow takes run times)."""
    return int(dt.datetime.fromisoformat(stamp).timestamp() * 1000)


def point_id(stage: str, point: dict[str, Any]) -> str:
    """Stable id of a measurement point: the same stage and resolved config give the same id."""
    blob = json.dumps({"stage": stage, "point": point}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Record:
    stage: str  # download, convert, bench_cpu, ...
    name: str  # readable name of the point (e.g. "q4_k_m" or "nf4-b4-static")
    # every setting that defines this measurement (its id is a hash of these + model)
    point: dict[str, Any]
    config: dict[str, Any]  # the resolved config sections the stage read
    model: dict[str, Any]  # name, id, revision, weights (real / random)
    environment: dict[str, Any]  # libraries, hardware, git
    status: str = "ok"  # ok / failed / skipped
    reason: str | None = None  # why it failed or was skipped
    # summary figures, each name carrying its unit
    metrics: dict[str, Any] = field(default_factory=dict)
    # raw repetitions behind the metrics
    samples: dict[str, list[float]] = field(default_factory=dict)
    # files this point produced (repo-relative)
    artifacts: dict[str, str] = field(default_factory=dict)
    sweep_id: str = ""  # one id per stage execution (the MLflow parent run)
    point_id: str = ""
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timestamp: str = field(default_factory=now)
    # when the measurement of this point started (ms); records before schema 2: unknown
    started: str = ""
    ended: str = ""  # when it ended (ms)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"record status {self.status!r}; allowed: {', '.join(STATUSES)}")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a {self.status} record needs a reason")
        if not self.point_id:
            self.point_id = point_id(self.stage, {"model": self.model.get("name"), **self.point})
        if not self.ended and self.schema_version >= 2:
            self.ended = now_ms()

    def span_ms(self) -> tuple[int, int]:
        """(start, end) of the measurement in epoch ms, as well as the record knows them."""
        end = epoch_ms(self.ended or self.timestamp)
        return (epoch_ms(self.started) if self.started else end), end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in upgrade(d).items() if k in known})


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A record read from a file, in today's schema: the one place where records of earlier
    schema versions are brought up to date (in memory; record files are never rewritten).
    Version 3: score records hold output drift under `drift` (before: `fidelity`); evaluate
    records hold their perplexity under `tokens.own` (before per-token quality: `perplexity`
    only). Records before version 2 have no start and end (see Record.span_ms). Two figures
    recorded before version 3 were wrong and are corrected here (see _recount_torchao and
    _reclassify_gemv); today's writers record them right, so no version says so."""
    if d.get("schema_version", 1) >= 3:
        return d
    m = d.get("metrics") or {}
    _reclassify_gemv(m)
    _recount_torchao(d.get("point") or {}, m)
    if "fidelity" in m and "drift" not in m:
        m["drift"] = m.pop("fidelity")
    generation = (d.get("stage") == "evaluate"
                  and (d.get("point") or {}).get("scenario") != "scores")
    if generation and "perplexity" in m and "tokens" not in m:
        m["tokens"] = {"own": {"perplexity": m["perplexity"]}}
    return d


def _reclassify_gemv(m: dict[str, Any]) -> None:
    """This project's fp16 Triton GEMV, named fp16_kernel in the profiles of 770803e, was
    classed "other" there: it is a matrix kernel (bench/kernel_kinds). Its time moves to matmul,
    and the weights' rate over matrix kernels is counted again with it."""
    by_kind = m.get("ms_per_step_by_kind")
    missed = [k for k in m.get("top_kernels") or []
              if k.get("name") == "fp16_kernel" and k.get("kind") != "matmul"]
    if not missed or not isinstance(by_kind, dict):
        return
    for k in missed:
        ms = k.get("ms_per_step") or 0
        if by_kind.get(k.get("kind")) is not None:
            by_kind[k["kind"]] = round(by_kind[k["kind"]] - ms, 4)
        by_kind["matmul"] = round((by_kind.get("matmul") or 0) + ms, 4)
        k["kind"] = "matmul"
    if m.get("weight_bytes") and by_kind["matmul"]:
        matmul_s = by_kind["matmul"] * 1e-3
        m["weight_gbps_over_matmul"] = round(m["weight_bytes"] / matmul_s / 1e9, 1)


def _recount_torchao(point: dict[str, Any], m: dict[str, Any]) -> None:
    """Torchao's packed weights were once counted at 16-bit size: what derives from it is unknown.

    Unknown: the roofline and the weights' rate over kernels, of records made before the weights
    were counted by their storage."""
    if (point.get("precision") not in TORCHAO_PRECISIONS
            or m.get("weight_bytes_method") == "storage"):
        return
    for key in ("weight_gbps_over_matmul", "weight_gbps_over_kernels"):
        m.pop(key, None)
    if isinstance(m.get("roofline"), dict):
        for key in ("roofline_fraction", "roofline_tps"):
            m["roofline"].pop(key, None)


def latest(items: Iterable[Any], key: Callable[[Any], Any],
           when: Callable[[Any], str] = lambda r: r.timestamp) -> list[Any]:
    """The latest item (record, or row) of each key: the one with the latest `when`, the later
    one among equals. In the order their keys were first met."""
    best: dict[Any, Any] = {}
    for item in items:
        k = key(item)
        if k not in best or when(item) >= when(best[k]):
            best[k] = item
    return list(best.values())


def model_note(model: dict[str, Any]) -> str:
    """What a reader of a model's quality figures must know about its weights: where they came
    from (e.g. a dequantized GGUF file) and the model config's note."""
    return "; ".join(str(x) for x in (model.get("derived_from"), model.get("note")) if x)


def instance_of(r: Record) -> str:
    """The machine instance a record was measured on (before instance ids: the host name)."""
    hw = r.environment.get("hardware", {})
    return hw.get("instance") or f"host-{hw.get('host', '?')}"


class WriteError(OSError):
    """A record could not be written whole (a full disk, a file-size limit, a read-only file);
    nothing of it stays in the file."""


def append(path: Path, record: Record) -> None:
    """Append one record as one whole line, or raise WriteError and leave the file as it was.

    Writers take turns through an exclusive flock on the file (other processes of this host, and
    hosts that share the folder where the filesystem supports it). Holding it, a torn last line
    (a writer killed mid-write, or cut short by a full disk before this check existed) is
    repaired first, so this record starts on a line of its own. The line is written with as many
    writes as the disk accepts; when it accepts no more, the bytes written are truncated away
    and the error is raised: a record is never left half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record.to_dict(), sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if this process dies
        start = _repair_tail(fd, path)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as e:
            # under the lock nobody appended after us: drop exactly our bytes
            os.ftruncate(fd, start)
            os.fsync(fd)
            raise WriteError(e.errno, f"the record of {record.stage} {record.name} could not "
                                      f"be written to {path} ({e.strerror or e}); nothing of it "
                                      "stays in the file. Free space and rerun: an interrupted "
                                      "sweep resumes where it stopped") from e
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        # a full disk or a file-size limit writes less than asked, then raises
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _repair_tail(fd: int, path: Path) -> int:
    """Make the file end with a newline; returns its size after the repair. A last line without
    its newline is kept (terminated) when it is a whole JSON record, and truncated away, with a
    warning, when it is torn."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    start, tail = size, b""
    while start > 0:  # back to the newline before the last line (lines can be hundreds of KB)
        n = min(1 << 16, start)
        block = os.pread(fd, n, start - n)
        cut = block.rfind(b"\n")
        if cut >= 0:
            tail = block[cut + 1:] + tail
            start = start - n + cut + 1
            break
        tail, start = block + tail, start - n
    try:
        Record.from_dict(json.loads(tail))
    except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        os.ftruncate(fd, start)
        os.fsync(fd)
        log.warning("%s: removed a torn last line (%d bytes, starting %r): its writer died or "
                    "ran out of disk mid-write, and that record was lost; the next record "
                    "starts on a line of its own", path, len(tail), tail[:60])
        return start
    _write_all(fd, b"\n")  # a whole record that only lacked its newline
    log.warning("%s: the last record had no newline; added one", path)
    return size + 1


def read(path: Path, garbled: list[str] | None = None) -> Iterator[Record]:
    """Records of a JSONL file; a line it cannot read is skipped.

    A torn last line (a writer killed mid-write: no newline) is skipped with a warning; any other
    is named ("file:line: why") in `garbled`."""
    if not path.exists():
        return
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                torn = not line.endswith("\n")  # only the last line can lack its newline
                what = "a torn last line" if torn else "an unreadable record"
                log.warning("%s:%d: skipping %s (%s)", path, n, what, e)
                if not torn and garbled is not None:
                    garbled.append(f"{path}:{n}: {e}")


def read_all(paths: Iterable[Path], garbled: list[str] | None = None) -> list[Record]:
    return [r for p in paths for r in read(p, garbled)]


def record_files(results: Path, experiments: bool = False) -> list[Path]:
    """The record files under a results folder: results/<stage>/<hardware>.jsonl. Never the
    evaluate stage's per-sample outputs (results/evaluate/outputs/**, which are not records);
    results/experiments/ (records moved out of the study) only when asked."""
    return [p for p in sorted(results.glob("*/*.jsonl"))
            if experiments or p.parent.name != "experiments"]


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; aggregates are ordinary files others read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def new_sweep_id(stage: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')
    return f"{stage}-{stamp}-{uuid.uuid4().hex[:6]}"
