"""Config sections that note which keys a stage read (`recording()`): what dvc.yaml must list as params."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

# the config keys read since recording() started (None: not recording)
_reads: set[str] | None = None


class Section:
    """A config section that can say which of its keys a stage read (`recording()`): what dvc.yaml
    must list as the stage's params. Each section of a loaded config knows its dotted path; a copy
    made by dataclasses.replace does not, and its reads are not noted (it was read from a noted
    section)."""

    _path: str | None = None

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _reads is not None and not name.startswith("_"):
            path = object.__getattribute__(self, "_path")
            if path is not None and name in type(self).__dataclass_fields__ and not isinstance(value, Section):
                _reads.add(path + name)
        return value


def name_sections(obj: Section, path: str = "") -> None:
    """Give every section of a loaded config its dotted path (model., bench_gpu.hf., ...)."""
    object.__setattr__(obj, "_path", path)
    for name in type(obj).__dataclass_fields__:
        value = object.__getattribute__(obj, name)
        if isinstance(value, Section):
            name_sections(value, f"{path}{name}.")


@contextmanager
def recording() -> Iterator[set[str]]:
    """Note every config key read inside the block (a leaf, e.g. `bench_gpu.hf.precisions`; a
    section converted whole by to_container counts as read whole)."""
    global _reads
    outer, _reads = _reads, set()
    try:
        yield _reads
    finally:
        if outer is not None:
            outer |= _reads
        _reads = outer


def to_container(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what records, MLflow and params.yaml carry)."""
    global _reads
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    outer, _reads = _reads, None  # the whole section is read: noted once, by its path
    try:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    finally:
        _reads = outer
        if _reads is not None and isinstance(cfg, Section) and cfg._path is not None:
            _reads.add(cfg._path.rstrip(".") or "*")
