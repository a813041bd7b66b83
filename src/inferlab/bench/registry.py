"""Scenarios by name: what a worker measures on the backend it loaded (backends run the model;
scenarios say what is measured). A scenario is a function (backend, point, folder, name) ->
(metrics, samples, artifacts): the point's settings, the prompts folder, the point's name. Adding
one is one function and one line in SCENARIOS; each imports its module when it runs, so a worker
loads only what it measures."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# metrics, raw samples, files written (repo-relative)
Result = tuple[dict[str, Any], dict[str, Any], dict[str, str]]
Scenario = Callable[[Any, dict[str, Any], Path, str], Result]


def latency(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.bench import scenarios

    metrics, samples = scenarios.latency(
        backend, folder, point["prompt_tokens"], point["new_tokens"], point.get("batch_size", 1),
        point["warmup"], point["repetitions"], api=point.get("api", "generate"),
    )
    return metrics, samples, {}


def prefix_cache(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.bench import hf_scenarios, scenarios

    fn = hf_scenarios.prefix_cache if backend.name == "hf" else scenarios.prefix_cache
    metrics, samples = fn(backend, folder, point["mode"], point["prefix_tokens"],
                          point["suffix_tokens"], point["requests"], point["new_tokens"])
    return metrics, samples, {}


def streaming(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.bench import hf_scenarios

    metrics, samples = hf_scenarios.streaming(
        backend, folder, point["prompt_tokens"], point["new_tokens"], point.get("batch_size", 1),
        point["warmup"], point["repetitions"],
    )
    return metrics, samples, {}


def assisted(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.bench import hf_scenarios

    metrics, samples = hf_scenarios.assisted(
        backend, backend.settings["texts"], point["lookup_tokens"], point["max_ngram"],
        point["max_prompt_tokens"], point["new_tokens"],
    )
    return metrics, samples, {}


def profile(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.bench import profile as prof

    metrics, samples = prof.decode_profile(backend, folder, point, name)
    return metrics, samples, {}


def quality(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    from inferlab.quality import generate

    return generate.run(backend, name, point)


SCENARIOS: dict[str, Scenario] = {
    "latency": latency,
    "prefix_cache": prefix_cache,
    "streaming": streaming,
    "assisted": assisted,
    "profile": profile,
    "quality": quality,
}


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        close = difflib.get_close_matches(name, list(SCENARIOS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}{hint}")
    return SCENARIOS[name]


def run(backend, point: dict[str, Any], folder: Path, name: str) -> Result:
    """Measure one point with its scenario (a point that names none measures latency)."""
    return get_scenario(point.get("scenario") or "latency")(backend, point, folder, name)
