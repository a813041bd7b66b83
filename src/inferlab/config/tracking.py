"""Where records are logged (MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from inferlab.config.checks import check_positive
from inferlab.config.section import Section


@dataclass
class TrackingConfig(Section):
    enabled: bool = True  # log to MLflow; records on disk are written either way
    # tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    uri: str | None = None
    experiment: str = "inferlab"
    timeout_s: float = 5.0  # how long to wait for a remote tracking server before giving up

    def __post_init__(self) -> None:
        check_positive("tracking.timeout_s", self.timeout_s)
