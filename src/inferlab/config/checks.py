"""Shared validation (ConfigError, checks naming key, value and what is allowed, did-you-mean) and paths."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the checkout this package was installed from


def project_root() -> Path:
    """The study folder: $INFERLAB_ROOT, else the nearest folder up from the working directory that
    holds dvc.yaml and conf/ (where DVC runs stages, also in an experiment's temporary copy), else
    this checkout."""
    env = os.environ.get("INFERLAB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return PACKAGE_ROOT


def conf_dir() -> Path:
    return project_root() / "conf"


def resolve(path: str | Path) -> Path:
    """Paths in the config are relative to the repository root, wherever the process runs."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


class ConfigError(ValueError):
    """A value that is not allowed; the message names the key, the value and what is allowed."""


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest option, or ''."""
    close = difflib.get_close_matches(value, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value in allowed:
        return
    hint = did_you_mean(str(value), [str(a) for a in allowed])
    choices = ", ".join(map(str, allowed))
    raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {choices}{hint}")


def check_all(key: str, values: Iterable[Any], allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    for v in values:
        check_choice(key, v, allowed)


def check_extras(key: str, points: Iterable[Any], allowed: dict[str, Iterable[Any]],
                 what: str = "extra_points") -> None:
    """Extra points: every field that is set must take one of the values its grid axis allows."""
    for p in points:
        for name, choices in allowed.items():
            if getattr(p, name) is not None:
                check_choice(f"{key}.{what}.{name}", getattr(p, name), list(choices))


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {bounds}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: above 0")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity): what thread counts are checked against."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(key: str, value: int, zero: bool = True) -> None:
    """A thread count: at most this machine's usable cores (more would measure the cores fighting
    each other); 0 means all of them where `zero`."""
    check_range(key, value, low=0 if zero else 1)
    cores = usable_cores()
    if value > cores:
        allowed = f"{'0 (all) or ' if zero else ''}1 to {cores}"
        raise ConfigError(f"{key}: {value} is above the {cores} usable cores of this machine; "
                          f"allowed {allowed}")


def check_non_empty(key: str, values: Sequence[Any], switch: str | None = None) -> None:
    if not values:
        off = f", or set {switch}=false" if switch else ""
        raise ConfigError(f"{key}: empty; give at least one value{off}")


def check_fits(key: str, parts: dict[str, int], limit_key: str, limit: int) -> None:
    """Tokens that must fit one context window (a prompt, a shared prefix, what follows them)."""
    total = sum(parts.values())
    if total > limit:
        what = " + ".join(f"{k} {v}" for k, v in parts.items())
        raise ConfigError(f"{key}: {what} = {total} tokens do not fit the context of {limit} "
                          f"({limit_key}); allowed: at most {limit} tokens in all; shorten them "
                          f"or raise {limit_key}")


def check_folder(key: str, value: str) -> None:
    path = resolve(value)
    if not path.is_dir():
        raise ConfigError(f"{key}: {value!r} is not a folder ({path} does not exist); give an "
                          "existing folder, relative to the repository or absolute")


def check_file(key: str, value: str) -> None:
    path = resolve(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value!r} is not a file ({path} does not exist); give an existing "
                          "file, relative to the repository or absolute")
