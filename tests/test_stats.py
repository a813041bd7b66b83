"""The statistics and per-request figures against hand-computed values."""

from __future__ import annotations

import math

import pytest

from inferlab.backends.timing import RequestTiming
from inferlab.bench.stats import percentile, summarize
from inferlab.sweep.memory import roofline


def test_summary_of_hand_computed_samples():
    s = summarize([10.0, 12.0, 11.0, 15.0, 9.0], "ms")
    assert s.n == 5 and s.unit == "ms"
    assert s.median == 11.0
    assert s.mean == pytest.approx(11.4)
    # sample variance: ((1.4)^2 + 0.6^2 + 0.4^2 + 3.6^2 + 2.4^2) / 4 = 21.2 / 4 = 5.3
    assert s.stdev == pytest.approx(math.sqrt(5.3))
    # p90 with linear interpolation: sorted [9, 10, 11, 12, 15], position 0.9 * 4 = 3.6 -> 12 + 0.6 * 3 = 13.8
    assert s.p90 == pytest.approx(13.8)
    assert s.p99 == pytest.approx(12 + 0.96 * 3)
    assert (s.min, s.max) == (9.0, 15.0)


def test_percentile_edges_and_even_count():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    one = summarize([3.0], "s")
    assert one.stdev == 0.0 and one.median == 3.0
    assert summarize([], "s").n == 0


def test_request_figures_from_timestamps():
    # issued at t=0; steps at 0.100, 0.120, 0.150, 0.170 s; returned at 0.175 s; batch 2, 64-token prompts
    t = RequestTiming(start=0.0, token_times=[0.100, 0.120, 0.150, 0.170], end=0.175, prompt_tokens=64,
                      generated_tokens=4, batch=2)
    f = t.figures()
    assert f["ttft_ms"] == pytest.approx(100.0)
    assert t.itl == pytest.approx([0.020, 0.030, 0.020])
    assert f["tpot_ms"] == pytest.approx(70.0 / 3)  # (0.170 - 0.100) / 3
    assert f["decode_tps"] == pytest.approx(3 / 0.070)  # per sequence
    assert f["total_tps"] == pytest.approx(2 * 4 / 0.175)  # all sequences
    assert f["prefill_tps"] == pytest.approx(2 * 64 / 0.100)
    assert f["e2e_ms"] == pytest.approx(175.0)


def test_non_streamed_request_has_ttft_equal_to_e2e():
    t = RequestTiming(start=1.0, token_times=[], end=1.5, prompt_tokens=8, generated_tokens=16)
    assert t.ttft == pytest.approx(0.5)
    assert math.isnan(t.figures()["decode_tps"])


def test_roofline():
    r = roofline(3020.0, 5_560_000_000, 214.0)  # the H100 anchor: fp16 Phi-2 at 3.02 TB/s
    assert r["roofline_tps"] == pytest.approx(543.2, abs=0.1)
    assert r["roofline_fraction"] == pytest.approx(214.0 / 543.17, abs=1e-3)
