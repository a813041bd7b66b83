"""Run inside a benchmark worker (the model loaded as for the sweeps): generate the evaluation outputs of one
configuration and compute its perplexity on the held-out passage. The per-sample outputs are written in one
write-then-rename, so a file is either complete or absent."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.backends.base import Backend
from inferlab.quality.dataset import answer_text


def perplexity(backend: Backend, ids: list[int], window: int, stride: int) -> tuple[float, float, int]:
    """Sliding-window perplexity: windows of `window` tokens moving by `stride`; every token after the first is
    scored exactly once, by the window in which it is newest. Returns (perplexity, mean NLL, tokens scored)."""
    if len(ids) < 2:
        raise ValueError("the perplexity passage needs at least two tokens")
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        lps = backend.token_logprobs(ids[begin:end])
        new = lps if begin == 0 else lps[len(lps) - (end - prev_end):]
        nll -= sum(new)
        count += len(new)
        prev_end = end
        if end == len(ids):
            break
    mean = nll / count
    return math.exp(mean), mean, count


def run(backend: Backend, name: str, point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    s = backend.settings
    items: list[dict[str, Any]] = s["items"]
    out_path = Path(s["outputs_dir"]) / f"{name}.jsonl"
    max_new: dict[str, int] = point["max_new_tokens"]
    batch = int(point.get("batch_size", 1))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    generated = 0
    for task in dict.fromkeys(i["task"] for i in items):  # one length per task: batch within a task
        task_items = [i for i in items if i["task"] == task]
        for k in range(0, len(task_items), batch):
            chunk = task_items[k:k + batch]
            ids = [backend.tokenize(i["prompt"]) for i in chunk]
            outs = backend.complete(ids, max_new[task])
            for item, p_ids, o_ids in zip(chunk, ids, outs):
                text = backend.detokenize(o_ids)
                generated += len(o_ids)
                rows.append({"item_id": item["id"], "task": task, "config": name, "point": point,
                             "prompt_tokens": len(p_ids), "output_ids": o_ids, "output_tokens": len(o_ids),
                             "output": text, "answer": answer_text(task, text), "reference": item["reference"]})
    gen_s = time.perf_counter() - t0
    blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    rec.write_atomic(out_path, blob)
    t1 = time.perf_counter()
    ppl, nll, scored = perplexity(backend, backend.tokenize(s["passage"]), point["ppl_window"], point["ppl_stride"])
    metrics = {
        "perplexity": round(ppl, 6), "nll_per_token": round(nll, 6), "ppl_tokens": scored,
        "perplexity_s": round(time.perf_counter() - t1, 3), "items": len(rows), "generated_tokens": generated,
        "generation_s": round(gen_s, 3), "outputs_file": out_path.name,
        "outputs_sha256": hashlib.sha256(blob.encode()).hexdigest(),
    }
    return metrics, {"output_tokens": [float(r["output_tokens"]) for r in rows]}
