"""Logging as every inferlab process sets it up: plain lines, third-party chatter cut down.

Some libraries log the same warning on every call (bitsandbytes: "MatMul8bitLt: inputs will be
cast from torch.bfloat16 to float16" once per matrix product, thousands of lines per run); such
a warning is shown once per process, saying that repeats are hidden.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers whose INFO lines say nothing a reader of a study's log needs
QUIET = ("httpx", "urllib3", "alembic", "filelock", "mlflow.store.db.utils", "absl",
         "matplotlib", "fontTools", "gguf")
# loggers that repeat one warning per call: shown once per process
REPEATING = ("bitsandbytes.autograd._functions", "bitsandbytes")


class OncePerProcess(logging.Filter):
    """Lets each distinct message template through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        record.msg = f"{record.msg} (shown once; later repeats are hidden)"
        return True


_ONCE = OncePerProcess()


def quiet_libraries() -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in REPEATING:
        logger = logging.getLogger(name)
        if _ONCE not in logger.filters:
            logger.addFilter(_ONCE)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S")
    quiet_libraries()
