"""The evaluation set (items with a task, input and reference) and the held-out text.

The project ships its own set (data/eval/items.jsonl: summaries, short answers, code). A Hub
dataset's file can be used instead (evaluate.dataset.source=hub), fetched through the Hub cache:
offline once cached, and failing within seconds, saying what to do, without the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inferlab.config import EvalDatasetConfig, EvaluateConfig, resolve


class DatasetUnavailable(RuntimeError):
    """The evaluation set cannot be read or fetched; the message says why and what to do."""


@dataclass(frozen=True)
class Item:
    id: str
    task: str  # summarization, qa, code
    input: str
    reference: str


def load_items(cfg: EvalDatasetConfig) -> list[Item]:
    local = cfg.source != "hub"
    items = _local_items(resolve(cfg.path) / "items.jsonl") if local else _hub_items(cfg)
    items = [i for i in items if i.task in cfg.tasks]
    if cfg.limit is not None:
        per_task: dict[str, int] = {}
        kept = []
        for i in items:
            per_task[i.task] = per_task.get(i.task, 0) + 1
            if per_task[i.task] <= cfg.limit:
                kept.append(i)
        items = kept
    if not items:
        raise DatasetUnavailable(f"the evaluation set has no items for the tasks {cfg.tasks}")
    return items


def _local_items(path: Path) -> list[Item]:
    if not path.is_file():
        raise DatasetUnavailable(
            f"{path} does not exist: evaluate.dataset.path must hold items.jsonl"
        )
    items, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = Item(str(d["id"]), d["task"], d["input"], d["reference"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetUnavailable(
                f"{path}:{n}: not an item with id, task, input and reference ({e})"
            ) from None
        if item.id in seen:
            raise DatasetUnavailable(f"{path}:{n}: duplicate item id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def _hub_items(cfg: EvalDatasetConfig) -> list[Item]:
    h = cfg.hub
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    from huggingface_hub import hf_hub_download

    from inferlab.models.acquire import hub_problem

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    problem = None if offline else hub_problem(f"datasets/{h.repo_id}")
    try:
        path = Path(hf_hub_download(h.repo_id, h.filename, repo_type="dataset", revision=h.revision,
                                    local_files_only=bool(offline or problem)))
    except Exception as e:  # offline, DNS, HTTP, not in the cache
        why = problem or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if offline or problem:
            why = f"{why or 'HF_HUB_OFFLINE is set'}, and the Hugging Face cache has no copy"
        raise DatasetUnavailable(
            f"cannot fetch {h.filename} of the Hub dataset {h.repo_id}: {why}. Use the shipped set "
            "(evaluate.dataset.source=local), or fill the cache once where the Hub is reachable "
            f"(`hf download {h.repo_id} {h.filename} --repo-type dataset`) and set "
            "HF_HUB_OFFLINE=1."
        ) from e
    rows = _read_rows(path)
    missing = [f for f in (h.input_field, h.reference_field) if rows and f not in rows[0]]
    if missing:
        raise DatasetUnavailable(f"evaluate.dataset.hub: fields {missing} are not in "
                                 f"{h.filename}; it has {sorted(rows[0])}")
    return [Item(str(r.get(h.id_field, n)) if h.id_field else str(n), h.task, str(r[h.input_field]),
                 str(r[h.reference_field])) for n, r in enumerate(rows[:h.limit])]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    if path.suffix == ".csv":
        import csv

        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise DatasetUnavailable(
        f"{path.name}: unsupported file type; use .parquet, .jsonl, .json or .csv"
    )


def prompt(item: Item, templates: dict[str, str]) -> str:
    return templates[item.task].replace("{input}", item.input)


_TOP_LEVEL = re.compile(r"^\S", re.MULTILINE)


def answer_text(task: str, text: str) -> str:
    """The answer in a continuation: its first line, or for code the body up to a top-level line.

    Applied alike to every configuration (and the reference), so it changes no comparison."""
    if task == "code":
        m = _TOP_LEVEL.search(text)
        return (text[:m.start()] if m else text).rstrip() + "\n"
    text = text.lstrip()
    return text.split("\n", 1)[0].strip()


def passage(cfg: EvaluateConfig) -> str:
    """The held-out text scored token by token (evaluate.tokens.text)."""
    path = resolve(cfg.tokens.text)
    if not path.is_file():
        raise DatasetUnavailable(f"evaluate.tokens.text: {path} does not exist")
    return path.read_text()


def digest(items: list[Item], text: str, cfg: EvaluateConfig) -> str:
    """Identity of what is generated: items, templates, lengths, passage (new set: new point)."""
    blob = json.dumps({"items": [asdict(i) for i in items], "templates": cfg.templates,
                       "max_new_tokens": cfg.max_new_tokens, "chat": cfg.chat, "passage": text,
                       "tokens": asdict(cfg.tokens)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
