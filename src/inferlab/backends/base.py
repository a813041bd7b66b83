"""The backend interface: what runs a model (what is measured: inferlab.bench's scenarios)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from inferlab.backends.timing import RequestTiming

if TYPE_CHECKING:
    import numpy as np


def log_softmax(logits) -> np.ndarray:
    """Row-wise log-softmax of (positions, vocabulary), as float32; each row's sum in float64."""
    import numpy as np

    x = np.array(logits, dtype=np.float32)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


class BackendUnavailable(RuntimeError):
    """This backend or setting cannot run here (no CUDA, a missing package): a skip, not a bug."""


class Backend(ABC):
    name: str

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings  # the point's load-relevant settings

    @abstractmethod
    def load(self) -> dict[str, Any]:
        """Load the model; returns load figures (load_s, weight_bytes, ...)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, without special tokens added."""

    @abstractmethod
    def request(self, prompts: list[list[int]], new_tokens: int, **opts: Any) -> RequestTiming:
        """Exactly new_tokens greedy tokens after each prompt (one batch); every step timed."""

    def complete(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (ids, EOS excluded), ending at EOS or after max_new_tokens."""
        raise NotImplementedError(f"{self.name} does not generate for evaluation")

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """float32 (len(ids), vocabulary) next-token log-probabilities after each ids[:i + 1]."""
        raise NotImplementedError(f"{self.name} does not score tokens")

    def scored_by(self) -> str:
        """What produces the distributions `logprobs` returns (a quality record names it)."""
        return "one forward pass over each window"

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, from one forward pass over ids."""
        import numpy as np

        lp = self.logprobs(ids)
        return lp[np.arange(len(ids) - 1), ids[1:]].astype(float).tolist()

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError(f"{self.name} does not detokenize")

    def stream(self, prompt: list[int], new_tokens: int, **opts: Any) -> Iterator[str]:
        """Text pieces as the runtime streams them (serving)."""
        raise NotImplementedError(f"{self.name} does not stream")

    @abstractmethod
    def unload(self) -> None:
        """Free the model."""
