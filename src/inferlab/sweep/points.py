"""A sweep point: one measurement, named by its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Point:
    name: str  # readable: q4_k_m-t2-b512-fa0-kvf16-generate-p64
    runtime: str  # backend name
    group: tuple  # points of one group share a worker process (one loaded model)
    settings: dict[str, Any]  # everything that defines the measurement (and goes into point_id)
    # worker load settings not part of the identity (paths)
    load: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # why this point cannot run here (recorded as skipped)

    def identity(self) -> dict[str, Any]:
        return {"runtime": self.runtime, **self.settings}

    def device(self) -> str:
        """cuda for transformers on CUDA or llama.cpp with offloaded layers, else cpu."""
        offloaded = self.runtime == "llama_cpp" and self.settings.get("n_gpu_layers")
        return "cuda" if self.settings.get("device") == "cuda" or offloaded else "cpu"
