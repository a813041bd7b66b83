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
