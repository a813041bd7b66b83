"""Record files under faults, for real: a disk that fills mid-write (a file-size limit in a child process), a torn
last line left behind by an earlier writer, and which files count as record files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferlab import records as rec


def make_record(sweep: str, name: str, pad: int = 0) -> rec.Record:
    """A small record (with `pad` raw samples to make its line longer)."""
    return rec.Record(stage="convert", name=name, point={"ftype": name}, config={}, model={"name": "tiny-phi"},
                      environment={"hardware": {"id": "test-hw"}}, sweep_id=sweep, samples={"pad": [0.5] * pad})


# Appends records in a child process whose files may grow only to LIMIT bytes (RLIMIT_FSIZE): the disk is "full"
# in the middle of the second record. Python ignores SIGXFSZ, so the write that crosses the limit is cut short
# and the next one fails with EFBIG, as on a full disk. Prints what append said for each record.
CHILD = r"""
import resource, sys
from pathlib import Path
from inferlab import records as rec
from tests.test_records import make_record

path, limit = Path(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
for r in [make_record("full-disk", f"q{i}", pad=400) for i in range(3)]:  # about 2.4 KB a line
    try:
        rec.append(path, r)
        print("appended", r.name, flush=True)
    except OSError as e:
        print("refused", r.name, type(e).__name__, e, flush=True)
"""

ROOT = Path(__file__).resolve().parents[1]


def _child(path: Path, limit: int, code: str = CHILD) -> str:
    r = subprocess.run([sys.executable, "-c", code, str(path), str(limit)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\n")


def test_a_full_disk_never_leaves_half_a_record_and_the_next_record_is_whole(tmp_path):
    path = tmp_path / "records.jsonl"
    said = _child(path, 4000)  # room for one 2.4 KB line and half of the next
    assert "appended q0" in said
    assert "refused q1" in said and "could not be written" in said  # loud, not silent
    assert path.read_bytes().endswith(b"\n")  # the half line was taken back
    # space again: the next record is whole and on its own line, and every record that was said to be written is
    rec.append(path, make_record("later", "q1"))
    got = list(rec.read(path))
    assert [r.name for r in got] == ["q0", "q1"] and [r.sweep_id for r in got] == ["full-disk", "later"]
    for line in _lines(path)[:-1]:
        json.loads(line)


# The append before this fix, cut short by a full disk the same way: one os.write, its count ignored.
OLD_APPEND = r"""
import json, os, resource, sys
from tests.test_records import make_record

path, limit = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
r = make_record("torn", "q1", pad=400)
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
print("wrote", os.write(fd, (json.dumps(r.to_dict()) + "\n").encode()))
"""


def test_a_torn_last_line_is_repaired_before_the_next_record(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    first = make_record("whole", "q1")
    rec.append(path, first)
    size = path.stat().st_size
    said = _child(path, size + 1000, OLD_APPEND)  # a writer that left 1,000 bytes of its line
    assert "wrote 1000" in said and path.stat().st_size == size + 1000
    second = make_record("after", "q2")
    rec.append(path, second)
    assert "removed a torn last line (1000 bytes" in caplog.text  # the loss is said
    got = list(rec.read(path))
    assert [r.record_id for r in got] == [first.record_id, second.record_id]  # the next record is not swallowed
    assert path.stat().st_size == size + len(json.dumps(second.to_dict(), sort_keys=True, default=str)) + 1
    # a whole record that only lacks its newline is kept, not truncated
    with path.open("ab") as f:
        f.write(json.dumps(make_record("no-newline", "q0").to_dict()).encode())
    rec.append(path, make_record("last", "q1"))
    assert [r.sweep_id for r in rec.read(path)] == ["whole", "after", "no-newline", "last"]


def test_record_files_are_the_stage_files_only(tmp_path):
    results = tmp_path / "results"
    for name in ("bench_cpu/hw.jsonl", "evaluate/hw.jsonl", "evaluate/outputs/hw/m/llama-q8_0.jsonl",
                 "experiments/bench_gpu-old.jsonl"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text("")
    rel = [p.relative_to(results).as_posix() for p in rec.record_files(results)]
    assert rel == ["bench_cpu/hw.jsonl", "evaluate/hw.jsonl"]
    assert "experiments/bench_gpu-old.jsonl" in [p.relative_to(results).as_posix()
                                                  for p in rec.record_files(results, experiments=True)]


def test_old_records_are_upgraded_when_read_and_rows_are_typed(tmp_path):
    """Records of schema 1 and 2 read in today's shape (records.upgrade), the file left as it was; table rows hold
    None where nothing was measured and real booleans."""
    from inferlab import aggregate
    from inferlab import fields as F

    env = {"hardware": {"id": "hw", "host": "h1"}}
    old = [{"stage": "evaluate", "name": "scores-a", "point": {"scenario": "scores"}, "config": {}, "model": {},
            "environment": env, "metrics": {"fidelity": {"rougeL": 0.5}}, "schema_version": 1},
           {"stage": "evaluate", "name": "a", "point": {"scenario": "quality"}, "config": {}, "model": {},
            "environment": env, "metrics": {"perplexity": 12.5}, "schema_version": 2}]
    path = tmp_path / "evaluate" / "hw.jsonl"
    path.parent.mkdir()
    text = "".join(json.dumps(d) + "\n" for d in old)
    path.write_text(text)
    score, gen = rec.read(path)
    assert score.metrics["drift"] == {"rougeL": 0.5} and "fidelity" not in score.metrics
    assert gen.metrics["tokens"] == {"own": {"perplexity": 12.5}}
    assert path.read_text() == text  # never rewritten
    new = make_record("s", "q8_0")
    assert new.schema_version == rec.SCHEMA_VERSION == 3 and rec.upgrade(new.to_dict()) == new.to_dict()
    assert aggregate.quality_rows(tmp_path)[0]["perplexity"] == 12.5

    r = rec.Record(stage="bench_cpu", name="p", point={"flash_attn": False, "n_threads": 2}, config={},
                   model={"name": "m"}, environment=env, metrics={"decode_tps": {"median": 10.123456}})
    row = aggregate.row(r)
    assert row["flash_attn"] is False and row["n_threads"] == 2 and row["decode_tps"] == 10.1235
    assert row["ttft_ms"] is None and row["quant"] is None and row["reason"] is None
    assert row["instance"] == "host-h1"  # records before instance ids: the host
    assert list(row) == [f.name for f in F.BENCH if f.column and f.read is not None]
    assert F.dig({"a": [{"b": 1}]}, "a.0.b") == 1 and F.dig({"a": 1}, "a.b.c") is None



def test_old_figures_recorded_wrong_are_corrected_when_read():
    """Records before schema 3: the fp16 GEMV profiled as "other" counts as matmul time; torchao points whose weights
    were counted at 16-bit size have no roofline and no rate over kernels. Today's records are left alone."""
    profile = {"ms_per_step_by_kind": {"matmul": 1.0, "other": 0.6}, "weight_bytes": 2_000_000_000,
               "top_kernels": [{"name": "fp16_kernel", "kind": "other", "ms_per_step": 0.5}],
               "weight_gbps_over_matmul": 2000.0}
    old = rec.upgrade({"schema_version": 1, "point": {"precision": "fp16"}, "metrics": profile})["metrics"]
    assert old["ms_per_step_by_kind"] == {"matmul": 1.5, "other": 0.1} and old["top_kernels"][0]["kind"] == "matmul"
    assert old["weight_gbps_over_matmul"] == 1333.3
    def torchao(**kw):
        return {"roofline": {"roofline_fraction": 0.9, "roofline_tps": 10.0, "bandwidth_gbps": 3000.0},
                "weight_gbps_over_matmul": 900.0, "weight_bytes": 10, **kw}

    old = rec.upgrade({"schema_version": 2, "point": {"precision": "int4-ao"}, "metrics": torchao()})["metrics"]
    assert old["roofline"] == {"bandwidth_gbps": 3000.0} and "weight_gbps_over_matmul" not in old
    counted = torchao(weight_bytes_method="storage")
    kept = rec.upgrade({"schema_version": 2, "point": {"precision": "int4-ao"}, "metrics": counted})["metrics"]
    assert kept["roofline"]["roofline_fraction"] == 0.9 and kept["weight_gbps_over_matmul"] == 900.0

def test_latest_keeps_the_newest_of_each_key_in_first_seen_order():
    a1, b1 = make_record("s", "a"), make_record("s", "b")
    a2 = make_record("s", "a")
    a1.timestamp, b1.timestamp, a2.timestamp = "2026-01-02", "2026-01-01", "2026-01-03"
    assert rec.latest([a1, b1, a2], lambda r: r.name) == [a2, b1]


def test_a_full_disk_is_called_a_full_disk(tmp_path):
    """paths.metrics on a filesystem with no space left (a 64 KiB tmpfs, filled): the stage refuses before any
    work, saying the disk is full, not that permissions are wrong."""
    from inferlab.config import compose
    from inferlab.stage import StorageError, check_storage

    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({r.stderr.strip()}): needs root")
    try:
        with pytest.raises(OSError) as full, open(mnt / "filler", "wb") as f:  # fill it
            while True:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        assert full.value.errno == errno.ENOSPC
        cfg = compose([f"paths.metrics={mnt}", f"paths.results={tmp_path / 'results'}", "paths.min_free_mb=0"])
        with pytest.raises(StorageError) as e:
            check_storage(cfg)
        assert f"paths.metrics: the disk of {mnt} is full" in str(e.value) and "permissions" not in str(e.value)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
