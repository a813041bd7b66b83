"""All MLflow logging goes through here, and always from records.

One parent run per stage execution (a sweep), one child run per record, tagged with the record's
id: records written while the store was unreachable are logged later by `inferlab log-records`,
and logging the same records again creates nothing.
"""

from inferlab.tracking.names import (
    TAG_KIND,
    TAG_LOGGED,
    TAG_LOGGER,
    TAG_NOTE,
    TAG_RECORD,
    TAG_SWEEP,
    mlflow_name,
)
from inferlab.tracking.result import LogResult
from inferlab.tracking.store import (
    StoreFailure,
    check_reachable,
    classify,
    prepare_sqlite,
    tracking_uri,
)
from inferlab.tracking.tracker import Tracker

__all__ = ["TAG_KIND", "TAG_LOGGED", "TAG_LOGGER", "TAG_NOTE", "TAG_RECORD", "TAG_SWEEP",
           "LogResult",
           "StoreFailure", "Tracker", "check_reachable", "classify", "mlflow_name",
           "prepare_sqlite", "tracking_uri"]
