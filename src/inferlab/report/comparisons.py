"""The comparisons a reader asks for first, as values found by their settings in one section or
sweep: 16-bit against 4-bit, batching, KV and prompt caches, streaming, decode loops, the peer
runtime, prompt lookup. `sweeps` chooses which to show; `sentences` puts them into words."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from inferlab.config import FOUR_BIT, GRAPH_MODES, INT4_KERNELS, SIXTEEN_BIT
from inferlab.report.table import Section


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what ran (label, point, notes) and what it measured (figures)."""

    label: str
    name: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # settings named beside the label (compile mode, fused block)
    same_tokens: bool | None = None  # a decode loop's tokens against generate()'s; None: unknown
    status: str = "ok"
    reason: str = ""

    def identity(self) -> tuple:
        return self.label, self.name, self.notes, self.same_tokens, self.status, self.reason


@dataclass(frozen=True)
class Borrowed:
    """The same format's quality on real weights (another model), for a random-weight point."""

    kind: str
    title: str  # the section that scored it
    quality: dict[str, Any]  # its quality row
    held_there: str = ""  # the group sizes each file holds, where they differ
    held_here: str = ""
    other_machine: bool = False


@dataclass(frozen=True)
class Comparison:
    """Two or more points compared by their settings, or why that could not be done (`missing`)."""

    topic: str  # the same topic in two sweeps is the same question
    kind: str  # which sentence words it (sentences.WORDS)
    sides: tuple[Side, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # what the sides share (batch, ...)
    figures: dict[str, Any] = field(default_factory=dict)  # figures of the comparison as a whole
    missing: str = ""  # what was not measured (or failed), where the comparison could not be made
    borrowed: Borrowed | None = None

    @property
    def made(self) -> bool:
        return not self.missing

    def configurations(self) -> tuple:
        """What was compared, figures left out: equal ones compared the same points."""
        borrowed = (self.borrowed.kind, self.borrowed.title) if self.borrowed else None
        sides = tuple(s.identity() for s in self.sides)
        return self.kind, sides, repr(sorted(self.settings.items())), self.missing, borrowed


def _figures(r: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: r.get(k) for k in keys}


def _generate(r: dict[str, Any]) -> bool:
    """A point decoded by transformers' generate() (not the fast or graph loop)."""
    return r.get("decode") in ("", None, "generate")


def plain_hf(r: dict[str, Any]) -> bool:
    return (r["runtime"] == "hf" and r.get("kv_cache") == "dynamic" and r.get("attn") == "sdpa"
            and r.get("compile") is False and _generate(r))


def plain_llama(r: dict[str, Any], threads: float | None, base: dict[str, Any] | None = None
                ) -> bool:
    """llama.cpp's main grid point: generate API, F16 KV cache, the grid's prompt length, n_batch
    and flash attention (`base`'s, where given; else no flash attention)."""
    base = base or {}
    return (r["runtime"] == "llama_cpp" and r.get("api") == "generate"
            and ("flash_attn" in base or r.get("flash_attn") is False)
            and r.get("kv_type") == "f16" and (threads is None or r.get("n_threads") == threads)
            and all(r.get(k) == v for k, v in base.items()))


def llama_grid(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt length, n_batch and flash attention most llama.cpp points ran with (the main
    grid's: without flash attention on a CPU, with it on a GPU)."""
    out = {}
    for key in ("prompt_tokens", "n_batch", "flash_attn"):
        values = [r.get(key) for r in rows if r["runtime"] == "llama_cpp"]
        if values:
            out[key] = max(set(values), key=values.count)
    return out


def kind(r: dict[str, Any]) -> str:
    return str(r.get("precision") or r.get("quant"))


def _first(rows: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, Any] | None:
    for k in kinds:
        for r in rows:
            if kind(r) == k:
                return r
    return None


def headline(section: Section) -> list[Comparison]:
    """The seed study's three comparisons, per runtime that ran here."""
    out: list[Comparison] = []
    cands = section.candidates
    llama_threads = max((r.get("n_threads") or 0 for r in cands if r["runtime"] == "llama_cpp"),
                        default=None)
    grid = llama_grid(cands)
    families = {
        "transformers": [r for r in cands if plain_hf(r)],
        "llama.cpp": [r for r in cands if plain_llama(r, llama_threads, grid)],
    }
    for family, rows in families.items():
        if rows:
            out += _headline(family, rows, llama_threads)
    return out


def _headline(family: str, rows: list[dict[str, Any]], threads: float | None) -> list[Comparison]:
    runtime = rows[0]["runtime"]
    b1 = [r for r in rows if r.get("batch_size") in (1, None)]
    base, q4 = _first(b1, SIXTEEN_BIT[runtime]), _first(b1, FOUR_BIT[runtime])
    where = " at batch 1"
    if runtime == "llama_cpp":
        where = (" (every layer on the GPU)" if rows[0].get("device") == "cuda"
                 else f" ({int(threads)} threads)" if threads else "")
    speed = f"{family}, 16-bit vs 4-bit speed{where}"
    if base is None or q4 is None:
        return [Comparison(speed, "speed", missing="a 16-bit" if base is None else "a 4-bit")]
    pair = (q4, base)
    speeds = tuple(Side(kind(r), r["name"], _figures(r, "decode_tps", "ttft_ms")) for r in pair)
    memory = tuple(Side(kind(r), r["name"], _figures(r, "memory_gib"), (r["memory_kind"],))
                   for r in pair)
    out = [Comparison(speed, "speed", speeds),
           Comparison(f"{family}, 16-bit vs 4-bit memory", "memory", memory)]
    if runtime == "llama_cpp":
        return out  # llama.cpp's sweep runs one sequence at a time: no batching
    topic = f"{family}, 4-bit with and without batching"
    batched = [r for r in rows if kind(r) == kind(q4) and (r.get("batch_size") or 1) > 1]
    if not batched:
        only = Comparison(topic, "batching", (Side(kind(q4), q4["name"]),), missing="batch 1 only")
        return [*out, only]
    big = max(batched, key=lambda r: r["batch_size"] or 0)
    sides = [Side(kind(q4), big["name"], _figures(big, "total_tps", "decode_tps", "memory_gib")),
             Side(kind(q4), q4["name"], _figures(q4, "total_tps"))]
    same = [r for r in rows if kind(r) == kind(base) and r["batch_size"] == big["batch_size"]]
    if same:
        figures = _figures(same[0], "total_tps", "memory_gib")
        sides.append(Side(kind(base), same[0]["name"], figures))
    return [*out, Comparison(topic, "batching", tuple(sides), {"batch": big["batch_size"]})]


def _by_name(section: Section, predicate) -> list[dict[str, Any]]:
    return [r for r in section.rows if predicate(r)]


KV_CACHES = (("no KV cache", ("none", False)), ("static cache", ("static", False)),
             ("static cache + torch.compile", ("static", True)))
SPEED = ("decode_tps", "ttft_ms", "memory_gib")


def cache_and_streaming(section: Section) -> list[Comparison]:
    """What the KV cache, the prompt (prefix) cache and streaming changed."""
    out: list[Comparison] = []
    hf = [r for r in section.candidates if r["runtime"] == "hf" and r.get("batch_size") == 1
          and r.get("attn") == "sdpa" and _generate(r)
          and r.get("compile_mode") in ("", None, "reduce-overhead")]
    for precision in sorted({r["precision"] for r in hf}):
        same = {(r["kv_cache"], r["compile"]): r for r in hf if r["precision"] == precision}
        dyn = same.get(("dynamic", False))
        others = [Side(label, same[key]["name"], _figures(same[key], *SPEED))
                  for label, key in KV_CACHES if key in same]
        if dyn is not None and others:
            sides = (Side("dynamic cache", dyn["name"], _figures(dyn, *SPEED)), *others)
            out.append(Comparison(f"KV cache ({precision}, batch 1)", "kv_cache", sides))
    out += decode_loops(section)
    kv = _by_name(section, lambda r: r["runtime"] == "llama_cpp" and r["scenario"] == "latency"
                  and r.get("kv_type") not in ("", "f16", None))
    for r in kv:
        side = Side(r["kv_type"], r["name"], _figures(r, "decode_tps", "memory_gib"))
        missing = "" if r["status"] == "ok" else f"{r['status']}: {r['reason'][:160]}"
        topic = f"llama.cpp KV cache {r['kv_type']}"
        out.append(Comparison(topic, "llama_kv", (side,), missing=missing))
    out += _prompt_cache(section) + _streaming(section)
    return out


def _prompt_cache(section: Section) -> list[Comparison]:
    out = []
    prefix = _by_name(section, lambda r: r["scenario"] == "prefix_cache")
    for runtime in sorted({r["runtime"] for r in prefix}):
        rows = [r for r in prefix if r["runtime"] == runtime]
        sides = [Side(r["mode"], r["name"], _figures(r, "ttft_ms", "cache_hits"))
                 for r in rows if r["status"] == "ok"]
        sides += [Side(r["mode"], r["name"], status=r["status"], reason=r["reason"][:120])
                  for r in rows if r["status"] != "ok"]
        name = "transformers" if runtime == "hf" else "llama.cpp"
        topic = f"Prompt cache ({name}, requests sharing a long prefix)"
        out.append(Comparison(topic, "prompt_cache", tuple(sides)))
    return out


def _streaming(section: Section) -> list[Comparison]:
    out = []
    for r in _by_name(section, lambda r: r["scenario"] == "streaming"):
        if r["status"] != "ok":
            out.append(Comparison("Streaming", "streaming", (Side("streamed", r["name"]),),
                                  missing=f"{r['status']}: {r['reason'][:160]}"))
            continue
        m = r["_metrics"]
        stream = m.get("stream_e2e_ms", {}).get("median")
        plain = m.get("plain_e2e_ms", {}).get("median")
        topic = f"Streaming (transformers TextIteratorStreamer, {r.get('precision')} batch 1)"
        sides = (Side("streamed", r["name"], {"e2e_ms": stream, "ttft_ms": r["ttft_ms"]}),
                 Side("plain", r["name"], {"e2e_ms": plain}))
        out.append(Comparison(topic, "streaming", sides, {"new_tokens": r["new_tokens"]}))
    stream = next((r for r in section.candidates if r["runtime"] == "llama_cpp"
                   and r.get("api") == "completion_stream"), None)
    if stream is not None:
        same = ("quant", "n_threads", "n_batch", "flash_attn", "kv_type", "prompt_tokens",
                "new_tokens")
        apis = {r["api"]: r for r in section.candidates if r["runtime"] == "llama_cpp"
                and all(r.get(k) == stream.get(k) for k in same)}
        sides = tuple(Side(api, r["name"], _figures(r, "total_tps", "ttft_ms"))
                      for api, r in sorted(apis.items()))
        topic = f"Streaming (llama.cpp, {stream['quant']}, {stream['n_threads']} threads)"
        out.append(Comparison(topic, "llama_streaming", sides))
    return out


LOOPS = (("generate, dynamic cache", lambda r: _generate(r) and r["kv_cache"] == "dynamic"),
         ("generate, static cache + compile", lambda r: _generate(r) and r.get("compile") is True),
         ("fast loop", lambda r: r.get("decode") == "fast"),
         ("CUDA-graph loop", lambda r: r.get("decode") == "graph"),
         ("hand-written step", lambda r: r.get("decode") == "kernels"))


def decode_loops(section: Section) -> list[Comparison]:
    """generate() against the fast and graph decode loops and the hand-written step, per precision
    and batch, the fastest of each."""
    out = []
    hf = [r for r in section.candidates if r["runtime"] == "hf" and r.get("attn") == "sdpa"]
    loops = [r for r in hf if not _generate(r)]
    for precision, batch in sorted({(r["precision"], r["batch_size"]) for r in loops}, key=str):
        same = [r for r in hf if r["precision"] == precision and r["batch_size"] == batch]
        sides = []
        for label, pick in LOOPS:
            rows = [r for r in same if pick(r)]
            if rows:
                best = max(rows, key=lambda r: r["decode_tps"] or 0)
                figures = _figures(best, "decode_tps", "total_tps", "itl_p50_ms")
                tokens = _same_tokens(best, same)
                sides.append(Side(label, best["name"], figures, _loop_notes(best), tokens))
        topic = f"Decode loop ({precision}, batch {int(batch)})"
        out.append(Comparison(topic, "decode_loop", tuple(sides)))
    return out


def _loop_notes(best: dict[str, Any]) -> tuple[str, ...]:
    """Compile mode, inductor, fusion and GEMV of a decode loop's point, those it set."""
    mode = (best.get("compile_mode") or "") if best.get("compile") is True else ""
    if best.get("decode") == "graph" and mode:  # the loop captures its own graph
        mode = GRAPH_MODES.get(mode, mode).removesuffix("-no-cudagraphs") + " kernels"
    fused = ("fused block" if best.get("fuse_block") is True
             else "fused q/k/v" if best.get("fuse_qkv") is True else "")
    gemv = "Triton GEMV" if best.get("gemv") == "triton" else ""
    return tuple(n for n in (mode, best.get("inductor"), fused, gemv) if n)


def _same_tokens(row: dict[str, Any], same: list[dict[str, Any]]) -> bool | None:
    """Whether a decode loop's measured requests generated generate()'s tokens for the same prompts
    (their digests, one sweep); None where either was not recorded."""
    plain = [r for r in same if _generate(r) and r["kv_cache"] == "dynamic"
             and r.get("output_digest")]
    if _generate(row) or not plain or not row.get("output_digest"):
        return None
    return row["output_digest"] == plain[0]["output_digest"]


HF_16, HF_8, HF_4 = SIXTEEN_BIT["hf"], ("int8", "int8-ao"), (*FOUR_BIT["hf"], *INT4_KERNELS)


def hf_b1(precisions: tuple[str, ...]):
    """Which rows are transformers points at batch 1 in one of these precisions."""
    return lambda r: (r["runtime"] == "hf" and r.get("batch_size") == 1
                      and r.get("precision") in precisions)


def best(rows: list[dict[str, Any]], key: str = "decode_tps") -> dict[str, Any] | None:
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key] or 0) if rows else None


def real_quality(sections: list[Section]) -> dict[tuple, tuple[str, dict[str, Any]]]:
    """(runtime, precision or quant[, hardware]) -> (section title, quality row) of each format
    scored on real weights: what a format costs where a section's own model has random weights."""
    out: dict[tuple, tuple[str, dict[str, Any]]] = {}
    for s in sections:
        for q in s.scored:
            if (q.get("meaningful") and q.get("kl_mean") is not None
                    and q.get("reference") != "itself" and not q.get("loop")):
                fmt = q.get("precision") or q.get("quant")
                out.setdefault((q.get("runtime"), fmt), (s.title, q))
                out.setdefault((q.get("runtime"), fmt, s.hardware), (s.title, q))
    return out


def real_for(real: dict | None, runtime: str | None, fmt: str | None, hardware: str
             ) -> tuple | None:
    """The format's real-weights quality on this hardware if any, else the first elsewhere."""
    real = real or {}
    return real.get((runtime, fmt, hardware)) or real.get((runtime, fmt))


def _groups(description: str | None) -> str:
    """The group sizes a quantization description names ("group sizes 32 (180 ...) and 128")."""
    found = re.search(r"group sizes? [0-9][^,;]*", description or "")
    return found.group(0) if found else ""


def _borrowed(row: dict[str, Any], section: Section, real: dict | None) -> Borrowed | None:
    """The same format on real weights, where the row's are random and its quality unknown."""
    if row.get("kl_mean") is not None or section.weights != "random" or not real:
        return None
    found = real_for(real, row["runtime"], kind(row), section.hardware)
    if found is None:
        return None
    title, q = found
    there, here = _groups(q.get("holds")), _groups((row.get("_metrics") or {}).get("quantization"))
    if not (there and here and there != here):
        there = here = ""
    return Borrowed(kind(row), title, q, there, here, q.get("hardware") != section.hardware)


def faster_decoding(section: Section, real: dict | None = None) -> list[Comparison]:
    """The fastest batch-1 transformers points at 16 and 4 bits (with the 4-bit format's quality
    on real weights where this model's are random), the peer runtime on this GPU, prompt lookup."""
    out: list[Comparison] = []
    fp16 = best([r for r in section.candidates if hf_b1(HF_16)(r)])
    q4 = best([r for r in section.candidates if hf_b1(HF_4)(r)])
    if fp16 is not None and q4 is not None and not _generate(fp16):
        speed = ("decode_tps", "itl_p50_ms", "memory_gib", "kl_mean")
        sides = (Side("16-bit", fp16["name"], _figures(fp16, *speed)),
                 Side("4-bit", q4["name"], _figures(q4, *speed, "top1", "ppl_ratio")))
        out.append(Comparison("Fastest batch-1 decoding (transformers)", "fastest", sides,
                              borrowed=_borrowed(q4, section, real)))
    out += _peer(section, fp16, q4) + _lookup(section)
    return out


def _peer(section: Section, fp16: dict | None, q4: dict | None) -> list[Comparison]:
    """llama.cpp with every layer on this GPU, and against transformers' fastest."""
    gpu_llama = [r for r in section.rows if r["runtime"] == "llama_cpp" and r["device"] == "cuda"
                 and r["scenario"] == "latency"]
    if not gpu_llama:
        return []
    out = []
    topic = "llama.cpp on this GPU (every layer offloaded, same GGUF files)"
    ok = [r for r in gpu_llama if r["status"] == "ok"]
    if ok:
        sides = tuple(Side(r["quant"], r["name"], _figures(r, *SPEED),
                           ("flash attention",) if r.get("flash_attn") is True else ())
                      for r in sorted(ok, key=lambda r: str(r["quant"])))
        out.append(Comparison(topic, "llama_gpu", sides))
        pairs: list[Side] = []
        for label, ours, kinds in (("16-bit", fp16, SIXTEEN_BIT["llama_cpp"]),
                                   ("4-bit", q4, FOUR_BIT["llama_cpp"])):
            theirs = best([r for r in ok if r.get("quant") in kinds])
            if ours is not None and theirs is not None:
                pairs += [Side(label, ours["name"], _figures(ours, "decode_tps")),
                          Side(theirs["quant"], theirs["name"], _figures(theirs, "decode_tps"))]
        if pairs:
            topic = "transformers' fastest against llama.cpp's, batch 1"
            out.append(Comparison(topic, "peer", tuple(pairs)))
    failed = [r for r in gpu_llama if r["status"] != "ok"]
    if failed:
        reasons = "; ".join(sorted({r["reason"].splitlines()[0][:140] for r in failed}))
        counts = {"failed": len(failed), "points": len(gpu_llama)}
        if ok:
            out.append(Comparison("llama.cpp on this GPU, points that did not run", "not_run",
                                  settings={"reasons": reasons}, figures=counts))
        else:
            out.append(Comparison(topic, "llama_gpu", figures=counts, missing=reasons))
    return out


def _lookup(section: Section) -> list[Comparison]:
    """Prompt-lookup decoding against plain decoding of the same requests."""
    out = []
    lookup = [r for r in section.rows if r["scenario"] == "assisted" and r["status"] == "ok"]
    plain = {(r.get("precision"), r.get("task")): r for r in lookup if r.get("lookup_tokens") == 0}
    for r in lookup:
        if not r.get("lookup_tokens"):
            continue
        m, base = r["_metrics"], plain.get((r.get("precision"), r.get("task")))
        n = int(r["lookup_tokens"] or 0)
        figures = {"total_tps": r["total_tps"], "requests": m.get("requests"),
                   "acceptance": m.get("acceptance_rate"),
                   "tokens_per_forward": m.get("tokens_per_forward", {}).get("median")}
        sides = [Side("prompt lookup", r["name"], figures)]
        agreement: dict[str, Any] = {}
        if base is not None:
            sides.append(Side("plain decoding", base["name"], _figures(base, "total_tps")))
            theirs = base["_metrics"]
            each, base_each = m.get("outputs_sha256_each"), theirs.get("outputs_sha256_each")
            if each and base_each and len(each) == len(base_each):
                agreeing = sum(a == b for a, b in zip(each, base_each))
                agreement = {"agreeing": agreeing, "compared": len(each)}
            else:
                agreement = {"all_agree": m.get("outputs_sha256") == theirs.get("outputs_sha256")}
        topic = f"Prompt lookup ({r.get('precision')}, {r.get('task')}, {n} candidates)"
        out.append(Comparison(topic, "lookup", tuple(sides), figures=agreement))
    return out
