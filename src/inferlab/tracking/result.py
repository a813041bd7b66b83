"""What one logging call did: each record logged now, already there, rejected, or not logged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogResult:
    uri: str = ""
    records: int = 0  # distinct records asked for
    created: int = 0  # runs logged now (and kept)
    present: int = 0  # records whose run was already complete in the store
    replaced: int = 0  # runs left incomplete by an earlier logger, deleted and logged again
    duplicates: int = 0  # runs of a record logged at the same time by another logger, deleted
    # (record name and id, the reason)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    # records another live logger had not finished
    pending: list[str] = field(default_factory=list)
    unreachable: str | None = None  # why the store could not be reached
    failed: str | None = None  # why the store failed as a whole

    @property
    def not_logged(self) -> int:
        return self.records - self.created - self.present

    @property
    def ok(self) -> bool:
        store_ok = self.unreachable is None and self.failed is None
        return self.not_logged == 0 and not self.rejected and store_ok

    def summary(self) -> str:
        done = f"{self.created} logged now, {self.present} already in MLflow"
        extra = [f"{n} {what}" for n, what in (
            (self.replaced, "unfinished run(s) of an earlier logger replaced"),
            (self.duplicates, "duplicate run(s) of a logger at the same time deleted")) if n]
        out = f"{self.records} record(s): {done}" + (f" ({'; '.join(extra)})" if extra else "")
        if self.rejected:
            out += f"; {len(self.rejected)} rejected by the store"
        if self.pending:
            out += f"; {len(self.pending)} still being logged by another process"
        if self.unreachable:
            out += f"; the store cannot be reached ({self.unreachable})"
        if self.failed:
            out += f"; the store failed ({self.failed})"
        if not self.ok:
            out += f"; {self.not_logged} not logged"
        return out
