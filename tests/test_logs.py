"""Logging: a third-party warning logged on every call appears once per process."""

from __future__ import annotations

import logging

from inferlab.logs import quiet_libraries


def test_a_warning_repeated_per_call_is_shown_once(caplog):
    quiet_libraries()
    bnb = logging.getLogger("bitsandbytes.autograd._functions")  # where bitsandbytes logs it, once per matmul
    with caplog.at_level(logging.WARNING):
        for _ in range(500):
            bnb.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        bnb.warning("another message")
    lines = [r.getMessage() for r in caplog.records if r.name == bnb.name]
    assert len(lines) == 2 and "later repeats are hidden" in lines[0] and "torch.bfloat16" in lines[0]
    absl = logging.getLogger("absl")  # rouge-score's "Using default tokenizer." on every scorer
    assert not absl.isEnabledFor(logging.INFO)


def test_study_console_shows_stages_progress_failures_and_the_answer(tmp_path, monkeypatch):
    """`inferlab study` on a terminal: a line per stage, progress at most every PROGRESS_EVERY_S seconds (and the
    last), every failed point, each warning once, then the answer from recommendation.json."""
    import io
    import json

    from inferlab import console

    clock = iter(float(t) for t in range(0, 10_000, 5))  # every call of the clock moves 5 s on
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    c = console.StudyConsole(["download", "bench_cpu", "report"], out)
    lines = ["Running stage 'bench_cpu':", "> python stages/bench_cpu.py --params params.yaml"]
    for i in range(1, 41):
        status = "failed (RuntimeError: boom)" if i == 7 else "ok"
        lines.append(f"12:00:{i:02d} INFO inferlab.sweep.run: [{i}/40] point-{i}: {status} in 1.0 s "
                     f"({40 - i} left, about 1 min to go)")
        lines.append("12:00:00 WARNING bitsandbytes: cast (shown once; later repeats are hidden)")
        lines.append("Loading weights: 100%|██████████| 33/33")
    lines += ["Updating lock file 'dvc.lock'", "Stage 'report' didn't change, skipping"]
    for line in lines:
        c.feed(line + "\n")
    (tmp_path / "recommendation.json").write_text(json.dumps({"studied": {"hardware": "cpu-2c", "model": "m"},
                                                               "recommendations": [
        {"hardware": "gpu-a", "model": "m", "status": "none", "reason": "no configuration meets ITL p90 " * 20},
        {"hardware": "cpu-2c", "model": "m", "status": "recommended", "name": "q4_0-t2",
         "settings": {"runtime": "llama_cpp", "quant": "q4_0"},
         "figures": {"total_tps": 123.4, "memory_gib": 0.2, "kl_mean": 0.012, "top1": 0.93}}]}))
    c.finish(0, tmp_path, tmp_path / "study.log", [])
    text = out.getvalue()
    assert text.startswith("[stage 2/3] bench_cpu\n")
    assert "7/40 done: point-7: failed (RuntimeError: boom)" in text and "40/40 done: point-40" in text
    progress = [line for line in text.splitlines() if " done: point-" in line]
    assert 3 <= len(progress) < 20  # rate-limited: not one line per point
    assert text.count("WARNING bitsandbytes") == 1 and "Loading weights" not in text
    assert "bench_cpu done in" in text and "[stage 3/3] report: unchanged, not rerun" in text
    answer = text[text.index("The answer"):].splitlines()  # this machine and model first, then the others
    assert answer[0] == "The answer for m on cpu-2c (this machine, the model studied): the fastest configuration " \
                        "that meets the constraints is"
    assert answer[1] == "  q4_0-t2 (quant=q4_0, runtime=llama_cpp): 123.4 tokens/s, 0.20 GiB, KL 0.012 nats/token, " \
                        "top-1 93.0%"
    assert answer[3].startswith("  m on gpu-a: no recommendation (no configuration meets") and len(answer[3]) < 160
    assert f"Report: {tmp_path / 'report.md'}" in text and len(text.splitlines()) < 30
