"""`inferlab study` on a terminal: the pipeline's stages and points done / left with the time
left, warnings and failures, then the answer. Everything the stages print goes to a log file;
the terminal gets a summary of it.

It reads the lines DVC and the stages print (DVC's "Running stage" lines, the sweeps' "[n/N]
point: status (k left, about T to go)" progress lines, log lines at WARNING and above) and shows
each stage's progress at most every PROGRESS_EVERY_S seconds, and every failed point.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TextIO

PROGRESS_EVERY_S = 20.0
STAGE = re.compile(r"^Running stage '([^']+)'")
UNCHANGED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
PROGRESS = re.compile(r"\[(\d+)/(\d+)\] (.*)$")
WARNING = re.compile(r"^\d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) ")
DVC_SAYS = ("ERROR:", "Ran experiment", "Experiment results have been applied",
            "Reproducing experiment")


class StudyConsole:
    """Feeds on the pipeline's output lines; prints a summary to `out`."""

    def __init__(self, stages: list[str], out: TextIO):
        self.stages, self.out = stages, out
        self.stage: str | None = None
        self.stage_t0 = 0.0
        self.last_progress = 0.0
        self.pending: str | None = None  # the latest progress line not yet shown
        self.seen_warnings: set[str] = set()
        self.lines = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
        self.lines += 1

    def _end_stage(self) -> None:
        if self.stage is None:
            return
        if self.pending:
            self.say(f"    {self.pending}")
            self.pending = None
        self.say(f"    {self.stage} done in {_fmt(time.monotonic() - self.stage_t0)}")
        self.stage = None

    def _position(self, name: str) -> str:
        if name not in self.stages:
            return "[stage]"
        return f"[stage {self.stages.index(name) + 1}/{len(self.stages)}]"

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if m := STAGE.match(line):
            self._end_stage()
            self.stage = m.group(1)
            self.stage_t0, self.last_progress = time.monotonic(), time.monotonic()
            self.say(f"{self._position(self.stage)} {self.stage}")
            return
        if m := UNCHANGED.match(line):
            self._end_stage()
            self.say(f"{self._position(m.group(1))} {m.group(1)}: unchanged, not rerun")
            return
        if line.startswith("Updating lock file") or line.startswith("Generating lock file"):
            self._end_stage()
            return
        if line.startswith(DVC_SAYS):
            self._end_stage()
            self.say(line)
            return
        if WARNING.match(line):
            key = re.sub(r"^\d\d:\d\d:\d\d ", "", line)[:200]
            if key not in self.seen_warnings:
                self.seen_warnings.add(key)
                self.say(f"    {key[:300]}")
            return
        if (m := PROGRESS.search(line)) and self.stage:
            done, total, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            text = f"{done}/{total} done: {rest}"
            if ": failed" in rest:
                self.say(f"    {text[:300]}")
                self.pending = None
            elif done == total or time.monotonic() - self.last_progress >= PROGRESS_EVERY_S:
                self.say(f"    {text[:300]}")
                self.pending = None
                self.last_progress = time.monotonic()
            else:
                self.pending = text[:300]

    def finish(self, rc: int, metrics_dir: Path, log_path: Path, tail: list[str]) -> None:
        self._end_stage()
        if rc != 0:
            self.say(f"The study stopped (exit code {rc}). The last lines of its log "
                     f"({log_path}):")
            for line in tail[-25:]:
                self.say(f"  {line.rstrip()}")
            return
        self.say("")
        for line in answer(metrics_dir):
            self.say(line)
        self.say(f"Full log: {log_path}")


def answer(metrics_dir: Path) -> list[str]:
    """The study's answer, from metrics/recommendation.json: the machine and model just studied
    first, then a line per other machine and model with records."""
    from inferlab.report.answer import lines

    path = metrics_dir / "recommendation.json"
    if not path.is_file():
        return ["No recommendation was written (the report stage did not run)."]
    return [*lines(json.loads(path.read_text())),
            f"Report: {metrics_dir / 'report.md'} (with figures: report.html beside it)",
            "MLflow: `inferlab ui` starts its UI and prints the link to this study's runs"]


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"
