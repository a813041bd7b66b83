"""Prompts cut to exact token lengths from text the project ships under data/prompts/.

Token counts come from the model's own tokenizer: "64 prompt tokens" is 64 for every model.
Each request gets a different window of the text, so no runtime can answer a repeated prompt
from a cache it keeps between requests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Tokenize = Callable[[str], list[int]]


def _read(folder: Path, name: str) -> str:
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(f"workload text {path} is missing")
    return path.read_text()


def prompts(tokenize: Tokenize, folder: Path, n_tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of exactly n_tokens, distinct windows of pool.txt (repeated if short)."""
    ids = tokenize(_read(folder, "pool.txt"))
    while len(ids) < n_tokens + count:
        ids = ids + ids
    stride = max(1, (len(ids) - n_tokens) // max(count, 1))
    return [ids[i * stride: i * stride + n_tokens] for i in range(count)]


def shared_prefix_requests(tokenize: Tokenize, folder: Path, prefix_tokens: int, suffix_tokens: int,
                           count: int) -> tuple[list[int], list[list[int]]]:
    """A long shared prefix (a document) and `count` distinct suffixes (questions about it)."""
    prefix = tokenize(_read(folder, "shared_prefix.txt") + "\n\n")
    pool = tokenize(_read(folder, "pool.txt"))
    while len(prefix) < prefix_tokens:
        prefix = prefix + pool
    prefix = prefix[:prefix_tokens]
    questions = [q for q in _read(folder, "questions.txt").splitlines() if q.strip()]
    suffixes = []
    for i in range(count):
        ids = tokenize("\n" + questions[i % len(questions)] + "\nAnswer:")
        while len(ids) < suffix_tokens:
            ids = ids + tokenize(" " + questions[(i + 1) % len(questions)])
        suffixes.append(ids[:suffix_tokens])
    return prefix, suffixes
