"""One configuration's evaluation, run inside a benchmark worker.

1. Greedy outputs for the evaluation items, written in one write-then-rename (complete or absent).
2. Quality per token over the held-out text (`inferlab.quality.tokens`): perplexity, rows stored
   for a reference, and the comparison with each reference stored earlier in the same sweep.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.backends.base import Backend
from inferlab.quality import tokens
from inferlab.quality.dataset import answer_text


def generations(backend: Backend, name: str, point: dict[str, Any],
                out_path: Path) -> dict[str, Any]:
    items: list[dict[str, Any]] = backend.settings["items"]
    max_new: dict[str, int] = point["max_new_tokens"]
    batch = int(point.get("batch_size", 1))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    generated = 0
    for task in dict.fromkeys(i["task"] for i in items):  # one length per task: batch within one
        task_items = [i for i in items if i["task"] == task]
        for k in range(0, len(task_items), batch):
            chunk = task_items[k:k + batch]
            ids = [i["prompt_ids"] for i in chunk]
            outs = backend.complete(ids, max_new[task])
            for item, p_ids, o_ids in zip(chunk, ids, outs):
                text = backend.detokenize(o_ids)
                generated += len(o_ids)
                rows.append({
                    "item_id": item["id"], "task": task, "config": name, "point": point,
                    "prompt_tokens": len(p_ids), "output_ids": o_ids, "output_tokens": len(o_ids),
                    "output": text, "answer": answer_text(task, text),
                    "reference": item["reference"],
                })
    blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    rec.write_atomic(out_path, blob)
    return {
        "items": len(rows), "generated_tokens": generated,
        "generation_s": round(time.perf_counter() - t0, 3), "outputs_file": out_path.name,
        "outputs_sha256": hashlib.sha256(blob.encode()).hexdigest(),
        "output_tokens": [float(r["output_tokens"]) for r in rows],
    }


def token_quality(backend: Backend, name: str, out_dir: Path) -> dict[str, Any]:
    """Perplexity, reference rows and per-token comparisons, as the load settings arrange them.

    `writes_reference`: the identity of the rows this configuration stores, or None;
    `against`: label -> {identity} of the rows to compare with."""
    s = backend.settings
    ids: list[int] = s["token_ids"]
    folder = Path(s["reference_dir"])
    t0 = time.perf_counter()
    writer = None
    sweep = {"sweep_id": s["sweep_id"]}  # compared only with rows measured in the same sweep
    if s.get("writes_reference"):
        ident = {**s["writes_reference"], **sweep}
        store = tokens.ReferenceStore(folder, ident["config"])
        writer = store.writer(len(ids) - 1, _vocab(backend, ids), ident)
    against, missing = {}, {}
    for label, want in (s.get("against") or {}).items():
        store = tokens.ReferenceStore(folder, want["identity"]["config"])
        if store.matches({**want["identity"], **sweep}):
            against[label] = store
        else:
            missing[label] = (
                f"no rows of the reference {want['identity']['config']} from this sweep on this "
                "machine (it failed, was skipped or has not run)"
            )
    own, stats = tokens.measure(backend, ids, s["tokens_window"], s["tokens_stride"], writer,
                                against)
    out: dict[str, Any] = {
        "own": own, "seconds": round(time.perf_counter() - t0, 3),
        "scored_by": backend.scored_by(),
    }
    if writer is not None:
        out["is_reference"] = True
    for label, st in stats.items():
        path = out_dir / f"{name}.tokens-{label}.npz"
        st.save(path)
        out[label] = {
            **tokens.summarize(st), "reference": against[label].name, "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    for label, why in missing.items():
        out[label] = {"missing": why}
    return out


def _vocab(backend: Backend, ids: list[int]) -> int:
    return int(backend.logprobs(ids[:2]).shape[1])


def run(backend: Backend, name: str,
        point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, str]]:
    """(metrics, samples, artifacts): the outputs file as a repo-relative artifact for tracking."""
    from inferlab.config import project_root

    out_dir = Path(backend.settings["outputs_dir"])
    # a decode loop: its quality per token, through its step (task answers come from generate())
    if point.get("loop"):
        tq = token_quality(backend, name, out_dir)
        return {"tokens": tq, "perplexity": round(tq["own"]["perplexity"], 6)}, {}, {}
    gen = generations(backend, name, point, out_dir / f"{name}.jsonl")
    samples = {"output_tokens": gen.pop("output_tokens")}
    tq = token_quality(backend, name, out_dir)
    path = (out_dir / gen["outputs_file"]).resolve()
    try:
        rel = path.relative_to(project_root().resolve()).as_posix()
    except ValueError:
        rel = str(path)
    metrics = {**gen, "tokens": tq, "perplexity": round(tq["own"]["perplexity"], 6)}
    return metrics, samples, {"outputs": rel}
