"""Record files under faults, for real: a disk that fills mid-write (a file-size limit in a child process), a torn
last line left behind by an earlier writer, and which files count as record files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
