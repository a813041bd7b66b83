"""Backends by name: one module and one line here each; heavy imports stay in the module."""

from __future__ import annotations

import importlib

from inferlab.backends.base import Backend, BackendUnavailable

REGISTRY = {
    "llama_cpp": "inferlab.backends.llama_cpp:LlamaCppBackend",
    "hf": "inferlab.backends.hf:HFBackend",
}


def get_backend(name: str) -> type[Backend]:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}{hint}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "BackendUnavailable", "get_backend", "REGISTRY"]
