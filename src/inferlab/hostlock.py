"""Lock files every process and user of one host share (sweeps' device locks, MLflow loggers).

flock on them: the kernel releases a lock when its holder dies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

UNKNOWN = "unknown"  # where the kernel does not say (not Linux)


def boot_id() -> str:
    """This boot of this host, a new id on every start: a process id means the same process only
    within one boot, and a host name reused by a new machine shows as a new instance."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return UNKNOWN


def lock_dir() -> Path:
    return Path(os.environ.get("INFERLAB_LOCK_DIR") or tempfile.gettempdir())


def open_lock(path: Path) -> int:
    """A descriptor of a lock file shared by every user of this host (the device is theirs too).

    flock needs no write access, so the file is opened read-only: one that another user created
    stays usable whatever its mode. A new file is made readable and writable by all (0666,
    whatever the umask). Symbolic links are not followed, and a file of someone else is not
    opened with O_CREAT (which fs.protected_regular refuses in a sticky folder such as /tmp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            continue  # another process made it just now: open theirs
        os.fchmod(fd, 0o666)  # ours: we just made it
        return fd
