"""Quality per token: how far a configuration's next-token distribution is from the reference's.

llama.cpp's `llama-perplexity --kl-divergence` method: the reference (the model's full precision
in the same runtime) stores its next-token log-probabilities over one fixed token sequence; each
other configuration is compared with it token by token: KL(reference || configuration), top-1
agreement (Wilson interval) and the perplexity ratio (paired, so the text's difficulty cancels).

Intervals treat tokens as independent, as llama.cpp does; neighbours are correlated, so the true
uncertainty is somewhat wider. Rows are stored as llama.cpp stores them, 16-bit over
[row max - LOGP_RANGE, row max], which moves a KL divergence by less than 1e-6.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferlab.backends.base import log_softmax

LOGP_RANGE = 40.0  # log-probabilities more than this below a row's top are stored as the floor
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
METHOD_VERSION = 1  # part of a reference's identity: bump when rows are computed or stored anew


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per forward pass over ids[begin:end]: p in [first, end - 1) is scored.

    Sliding windows score every position 0 .. n - 2 once, each with the longest context it gets."""
    if n < 2:
        raise ValueError("the scored text needs at least two tokens")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, begin if begin == 0 else prev_end - 1))
        prev_end = end
        if end == n:
            break
    return out


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def rows(
    backend: Any, ids: list[int], window: int, stride: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, float32 next-token log-probability rows over the vocabulary) per window."""
    for begin, end, first in windows(len(ids), window, stride):
        lp = backend.logprobs(ids[begin:end])  # (end - begin, vocab): after ids[begin..p]
        yield first, lp[first - begin:end - 1 - begin]


@dataclass
class TokenStats:
    """Per scored position: KL(reference || configuration), top-1 agreement, both models' NLL."""

    kl: np.ndarray
    agree: np.ndarray
    nll: np.ndarray
    nll_ref: np.ndarray

    @classmethod
    def concat(cls, parts: list[TokenStats]) -> TokenStats:
        fields = ("kl", "agree", "nll", "nll_ref")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, kl=self.kl.astype(np.float32), agree=self.agree.astype(np.bool_),
                nll=self.nll.astype(np.float32), nll_ref=self.nll_ref.astype(np.float32),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TokenStats:
        with np.load(path) as z:
            return cls(z["kl"], z["agree"], z["nll"], z["nll_ref"])



def compare(ref: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> TokenStats:
    """Token statistics of rows `lp` against reference rows `ref`; targets[i] follows i."""
    # both renormalized (stored rows after dequantization, and rounding in either), in float32:
    # it keeps a KL divergence of 4e-6 within 0.3% of float64's, at a fifth of the time
    r, q = log_softmax(ref), log_softmax(lp)
    idx = np.arange(len(targets))
    agree = r.argmax(axis=1) == q.argmax(axis=1)
    nll, nll_ref = -q[idx, targets].astype(np.float64), -r[idx, targets].astype(np.float64)
    kl = (np.exp(r) * (r - q)).sum(axis=1, dtype=np.float64)
    # rounding can take a zero divergence below zero
    return TokenStats(np.maximum(kl, 0.0), agree, nll, nll_ref)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarize(s: TokenStats) -> dict[str, Any]:
    """The figures a record carries, each with a 95% interval (tokens taken as independent)."""
    n = len(s.kl)
    k = int(s.agree.sum())
    lo, hi = wilson(k, n)
    kl_sem = _sem(s.kl)
    nll, nll_ref = float(s.nll.mean()), float(s.nll_ref.mean())
    nll_sem = _sem(s.nll)
    diff = s.nll - s.nll_ref
    d, d_sem = float(diff.mean()), _sem(diff)
    q = np.quantile(s.kl, [0.5, 0.9, 0.99])
    kl_mean = s.kl.mean()
    return {
        "tokens": n,
        "kl_mean": float(kl_mean), "kl_sem": kl_sem,
        "kl_ci95": [float(max(0.0, kl_mean - Z95 * kl_sem)), float(kl_mean + Z95 * kl_sem)],
        "kl_median": float(q[0]), "kl_p90": float(q[1]), "kl_p99": float(q[2]),
        "kl_max": float(s.kl.max()),
        "top1": k / n, "top1_agree": k, "top1_ci95": [lo, hi],
        "perplexity": math.exp(nll), "nll_mean": nll, "nll_sem": nll_sem,
        "perplexity_ci95": [math.exp(nll - Z95 * nll_sem), math.exp(nll + Z95 * nll_sem)],
        "reference_perplexity": math.exp(nll_ref),
        "ln_ppl_ratio": d, "ln_ppl_ratio_sem": d_sem,
        "ppl_ratio": math.exp(d),
        "ppl_ratio_ci95": [math.exp(d - Z95 * d_sem), math.exp(d + Z95 * d_sem)],
    }


def own_perplexity(nll: np.ndarray) -> dict[str, Any]:
    """Perplexity figures without a reference to compare with (or of the reference)."""
    mean, sem = float(nll.mean()), _sem(nll)
    return {
        "tokens": len(nll), "perplexity": math.exp(mean), "nll_mean": mean, "nll_sem": sem,
        "perplexity_ci95": [math.exp(mean - Z95 * sem), math.exp(mean + Z95 * sem)],
    }


class ReferenceStore:
    """The reference's rows on disk: <name>.u16.npy (positions x vocab) and <name>.json.

    The JSON holds each row's floor and step, and the rows' identity (ids, windows, config)."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name
        self.data = folder / f"{name}.u16.npy"
        self.meta_path = folder / f"{name}.json"
        self._scale: tuple[np.ndarray, np.ndarray] | None = None

    def meta(self) -> dict[str, Any] | None:
        """What the stored rows are, or None when there are none (or only a half-written set)."""
        if not (self.meta_path.exists() and self.data.exists()):
            return None
        return json.loads(self.meta_path.read_text())

    def matches(self, identity: dict[str, Any]) -> bool:
        meta = self.meta()
        return meta is not None and meta.get("identity") == identity

    def writer(self, n: int, vocab: int, identity: dict[str, Any]) -> ReferenceWriter:
        return ReferenceWriter(self, n, vocab, identity)

    def read(self, first: int, count: int) -> np.ndarray:
        """Rows first .. first + count - 1, dequantized to float32 log-probabilities."""
        if self._scale is None:
            meta = self.meta()
            if meta is None:
                raise FileNotFoundError(f"no reference rows at {self.data}")
            self._scale = (np.asarray(meta["floor"], dtype=np.float32),
                           np.asarray(meta["step"], dtype=np.float32))
        floor, step = (a[first:first + count, None] for a in self._scale)
        q = np.load(self.data, mmap_mode="r")[first:first + count]
        return floor + q.astype(np.float32) * step


class ReferenceWriter:
    """Rows added window by window to a temporary file that `commit` renames into place.

    So an interrupted reference leaves no rows that look finished."""

    def __init__(self, store: ReferenceStore, n: int, vocab: int, identity: dict[str, Any]):
        store.folder.mkdir(parents=True, exist_ok=True)
        self.store, self.n, self.identity = store, n, identity
        self.tmp = store.data.with_name(f".{store.data.name}.partial")
        self.out = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint16,
                                             shape=(n, vocab))
        self.floor = np.zeros(n, dtype=np.float32)
        self.step = np.zeros(n, dtype=np.float32)
        self.written = 0

    def add(self, first: int, lp: np.ndarray) -> None:
        top = lp.max(axis=1, keepdims=True)
        floor = np.maximum(lp.min(axis=1, keepdims=True), top - LOGP_RANGE)
        step = np.maximum((top - floor) / 65535.0, 1e-12)
        q = np.rint((np.maximum(lp, floor) - floor) / step).astype(np.uint16)
        self.out[first:first + len(lp)] = q
        self.floor[first:first + len(lp)] = floor[:, 0]
        self.step[first:first + len(lp)] = step[:, 0]
        self.written += len(lp)

    def commit(self) -> None:
        if self.written != self.n:
            self.abort()
            raise RuntimeError(f"reference rows: {self.written} written for {self.n} positions")
        self.out.flush()
        del self.out
        self.store.meta_path.unlink(missing_ok=True)  # never beside rows it does not describe
        self.tmp.replace(self.store.data)
        meta = {"identity": self.identity, "positions": self.n, "floor": self.floor.tolist(),
                "step": self.step.tolist()}
        tmp_meta = self.store.meta_path.with_name(f".{self.store.meta_path.name}.partial")
        tmp_meta.write_text(json.dumps(meta))
        tmp_meta.replace(self.store.meta_path)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def measure(
    backend: Any, ids: list[int], window: int, stride: int, write: ReferenceWriter | None = None,
    against: dict[str, ReferenceStore] | None = None,
) -> tuple[dict[str, Any], dict[str, TokenStats]]:
    """One pass: own perplexity, rows stored if a reference (`write`), stats per `against`."""
    targets = np.asarray(ids[1:], dtype=np.int64)
    nll: list[np.ndarray] = []
    parts: dict[str, list[TokenStats]] = {label: [] for label in against or {}}
    try:
        for first, lp in rows(backend, ids, window, stride):
            t = targets[first:first + len(lp)]
            nll.append(-lp[np.arange(len(lp)), t].astype(np.float64))
            if write is not None:
                write.add(first, lp)
            for label, ref in (against or {}).items():
                parts[label].append(compare(ref.read(first, len(lp)), lp, t))
        if write is not None:
            write.commit()
    except BaseException:
        if write is not None:
            write.abort()
        raise
    stats = {label: TokenStats.concat(p) for label, p in parts.items()}
    return own_perplexity(np.concatenate(nll)), stats
