"""The comparisons a reader asks for first, restated from this study's records: 16-bit against 4-bit (speed and
memory), 4-bit with and without batching, and what the KV cache, the prompt cache and streaming changed.

Each comparison finds its two points by their settings; where one was not measured (or failed) it says so. Two
points are compared only where they were measured together, in one sweep on one machine instance: `together`
runs a comparison within each such group and keeps the ranked group's, else the newest group's that holds both
sides; where no group holds both, the report says so instead of comparing."""

from __future__ import annotations

import re
from typing import Any

from inferlab.config import FOUR_BIT, GRAPH_MODES, INT4_KERNELS, SIXTEEN_BIT
from inferlab.report.table import Section, fmt


class Missing(str):
    """A comparison that could not be made here (one side was not measured): `together` looks for another group
    that holds both sides before it shows this."""


def _topic(text: str) -> str:
    """A comparison's topic: its bold lead (**KV cache (fp16, batch 1)**), else the whole sentence."""
    return text[2:text.index("**", 2)] if text.startswith("**") and "**" in text[2:] else text


def together(section: Section, compare) -> list[str]:
    """`compare` (section -> sentences) made within one group at a time: per topic, the ranked group's complete
    sentence first, then the next group's that compares other configurations (further groups are counted, not
    repeated), else the newest group's; a topic complete only when groups are mixed is
    reported as not measured together, never compared."""
    if not section.history:
        return compare(section)
    found: dict[str, list[tuple[tuple, str, bool]]] = {}
    for g in section.groups:
        for text in compare(section.view(g)):
            found.setdefault(_topic(text), []).append((g, str(text), not isinstance(text, Missing)))
    mixed = {_topic(t) for t in compare(section.merged()) if not isinstance(t, Missing)}
    out = []
    for topic, entries in found.items():
        complete = [e for e in entries if e[2]]
        if complete:  # each sweep's own sentence when they differ (another sweep may hold other configurations)
            shown: dict[str, list] = {}
            for g, text, _ in complete:
                shown.setdefault(_figures_free(text), []).append((g, text))
            kinds = list(shown.values())
            for i, same in enumerate(kinds[:2]):  # the ranked group's, and the next that compares others
                g, text = same[0]
                others = len(same) - 1
                also = f"; the same comparison in {others} other sweep(s)" if others else ""
                if i == 1 and len(kinds) > 2:
                    also += f"; {sum(len(k) for k in kinds[2:])} more sweep(s) compared other configurations"
                out.append(f"{text} _({section.label(g)}{also})_")
            continue
        text = str(entries[0][1])
        if topic in mixed:
            text += (" (Both sides were measured, but never in one sweep on one machine instance: not compared "
                     "across sweeps.)")
        out.append(text)
    for topic in sorted(mixed - set(found)):
        out.append(f"**{topic}**: its points were measured only in different sweeps or on different machine "
                   "instances: not compared.")
    return out


def _figures_free(text: str) -> str:
    """A comparison sentence with its figures taken out: two sweeps whose sentences match this way compared the
    same configurations."""
    return re.sub(r"(?<![A-Za-z0-9_.\-])[0-9][0-9,.]*(?![A-Za-z0-9_])", "#", text)  # not int4, q4_0, fp16, p50


def _f(v: Any, unit: str = "") -> str:
    return "not measured" if v is None or v != v else f"{fmt(v)} {unit}".rstrip()


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}×" if a is not None and a == a and b else "n/a"


def _generate(r: dict[str, Any]) -> bool:
    """A point decoded by transformers' generate() (not the fast or graph loop)."""
    return r.get("decode") in ("", None, "generate")


def plain_hf(r: dict[str, Any]) -> bool:
    return (r["runtime"] == "hf" and r.get("kv_cache") == "dynamic" and r.get("attn") == "sdpa"
            and r.get("compile") is False and _generate(r))


def plain_llama(r: dict[str, Any], threads: float | None, base: dict[str, Any] | None = None) -> bool:
    """llama.cpp's main grid point: generate API, F16 KV cache, the grid's prompt length, n_batch and flash
    attention (those of `base`, the section's most common ones, where given; else no flash attention)."""
    base = base or {}
    return (r["runtime"] == "llama_cpp" and r.get("api") == "generate"
            and ("flash_attn" in base or r.get("flash_attn") is False)
            and r.get("kv_type") == "f16" and (threads is None or r.get("n_threads") == threads)
            and all(r.get(k) == v for k, v in base.items()))


def llama_grid(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt length, n_batch and flash attention most llama.cpp points ran with (the main grid's: without
    flash attention on a CPU, with it on a GPU)."""
    out = {}
    for key in ("prompt_tokens", "n_batch", "flash_attn"):
        values = [r.get(key) for r in rows if r["runtime"] == "llama_cpp"]
        if values:
            out[key] = max(set(values), key=values.count)
    return out


def _kind(r: dict[str, Any]) -> str:
    return str(r.get("precision") or r.get("quant"))


def _first(rows: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, Any] | None:
    for k in kinds:
        for r in rows:
            if _kind(r) == k:
                return r
    return None


def headline(section: Section) -> list[str]:
    """The seed study's three comparisons, per runtime that ran here, as sentences with this run's figures."""
    out: list[str] = []
    cands = section.candidates
    llama_threads = max((r.get("n_threads") or 0 for r in cands if r["runtime"] == "llama_cpp"), default=None)
    grid = llama_grid(cands)
    families = {
        "transformers": [r for r in cands if plain_hf(r)],
        "llama.cpp": [r for r in cands if plain_llama(r, llama_threads, grid)],
    }
    for family, rows in families.items():
        if not rows:
            continue
        runtime = rows[0]["runtime"]
        b1 = [r for r in rows if r.get("batch_size") in (1, None)]
        base, q4 = _first(b1, SIXTEEN_BIT[runtime]), _first(b1, FOUR_BIT[runtime])
        where = " at batch 1"
        if runtime == "llama_cpp":
            where = (" (every layer on the GPU)" if rows[0].get("device") == "cuda"
                     else f" ({int(llama_threads)} threads)" if llama_threads else "")
        if base is None or q4 is None:
            missing = "a 16-bit" if base is None else "a 4-bit"
            out.append(Missing(f"**{family}, 16-bit vs 4-bit speed{where}**: {missing} configuration was not "
                               "measured here, so 16-bit vs 4-bit cannot be compared."))
            continue
        out.append(
            f"**{family}, 16-bit vs 4-bit speed{where}**: {_kind(q4)} decodes {_f(q4['decode_tps'], 'tokens/s')} "
            f"against {_kind(base)}'s {_f(base['decode_tps'], 'tokens/s')} "
            f"({_ratio(q4['decode_tps'], base['decode_tps'])} the speed); "
            f"TTFT {_f(q4['ttft_ms'], 'ms')} vs {_f(base['ttft_ms'], 'ms')}.")
        out.append(
            f"**{family}, 16-bit vs 4-bit memory**: {_kind(q4)} peaks at {_f(q4['memory_gib'], 'GiB')} "
            f"({q4['memory_kind']}) against {_f(base['memory_gib'], 'GiB')} for {_kind(base)} "
            f"({_ratio(q4['memory_gib'], base['memory_gib'])}).")
        batched = [r for r in rows if _kind(r) == _kind(q4) and (r.get("batch_size") or 1) > 1]
        if runtime == "llama_cpp":
            continue  # llama.cpp's sweep runs one sequence at a time: batching is a transformers comparison
        if not batched:
            out.append(Missing(f"**{family}, 4-bit with and without batching**: {_kind(q4)} ran at batch 1 only "
                               "here."))
            continue
        big = max(batched, key=lambda r: r["batch_size"] or 0)
        base_big = next((r for r in rows if _kind(r) == _kind(base) and r["batch_size"] == big["batch_size"]), None)
        sentence = (f"**{family}, 4-bit with and without batching**: {_kind(q4)} at batch {big['batch_size']} "
                    f"delivers {_f(big['total_tps'], 'tokens/s')} in total against {_f(q4['total_tps'], 'tokens/s')} "
                    f"at batch 1 ({_ratio(big['total_tps'], q4['total_tps'])}), each sequence at "
                    f"{_f(big['decode_tps'], 'tokens/s')}, in {_f(big['memory_gib'], 'GiB')}")
        if base_big is not None:
            sentence += (f"; {_kind(base)} at the same batch: {_f(base_big['total_tps'], 'tokens/s')} in "
                         f"{_f(base_big['memory_gib'], 'GiB')}, so batched 4-bit reaches "
                         f"{_ratio(big['total_tps'], base_big['total_tps'])} of its throughput")
        out.append(sentence + ".")
    return out


def _by_name(section: Section, predicate) -> list[dict[str, Any]]:
    return [r for r in section.rows if predicate(r)]


def cache_and_streaming(section: Section) -> list[str]:
    """What the KV cache, the prompt (prefix) cache and streaming changed, from the points that vary them."""
    out: list[str] = []
    hf = [r for r in section.candidates if r["runtime"] == "hf" and r.get("batch_size") == 1
          and r.get("attn") == "sdpa" and _generate(r) and r.get("compile_mode") in ("", None, "reduce-overhead")]
    for precision in sorted({r["precision"] for r in hf}):
        same = {(r["kv_cache"], r["compile"]): r for r in hf if r["precision"] == precision}
        dyn = same.get(("dynamic", False))
        others = [(label, same.get(key)) for label, key in (("no KV cache", ("none", False)),
                                                            ("static cache", ("static", False)),
                                                            ("static cache + torch.compile", ("static", True)))]
        others = [(label, r) for label, r in others if r is not None]
        if dyn is None or not others:
            continue
        parts = [f"{label} {_f(r['decode_tps'], 'tokens/s')} ({_ratio(r['decode_tps'], dyn['decode_tps'])}), "
                 f"TTFT {_f(r['ttft_ms'], 'ms')}, {_f(r['memory_gib'], 'GiB')}" for label, r in others]
        out.append(f"**KV cache ({precision}, batch 1)**: dynamic cache {_f(dyn['decode_tps'], 'tokens/s')}, "
                   f"TTFT {_f(dyn['ttft_ms'], 'ms')}, {_f(dyn['memory_gib'], 'GiB')}; " + "; ".join(parts) + ".")
    out += decode_loops(section)
    kv = _by_name(section, lambda r: r["runtime"] == "llama_cpp" and r["scenario"] == "latency"
                  and r.get("kv_type") not in ("", "f16", None))
    for r in kv:
        if r["status"] == "ok":
            out.append(f"**llama.cpp KV cache {r['kv_type']}** ({r['name']}): {_f(r['decode_tps'], 'tokens/s')}, "
                       f"{_f(r['memory_gib'], 'GiB')}.")
        else:
            out.append(Missing(f"**llama.cpp KV cache {r['kv_type']}** ({r['name']}): {r['status']}: "
                               f"{r['reason'][:160]}"))

    prefix = _by_name(section, lambda r: r["scenario"] == "prefix_cache")
    for runtime in sorted({r["runtime"] for r in prefix}):
        rows = [r for r in prefix if r["runtime"] == runtime]
        ok = [r for r in rows if r["status"] == "ok"]
        parts = [f"{r['mode']}: TTFT {_f(r['ttft_ms'], 'ms')}"
                 + (f" ({_f(r['cache_hits'])} cache hits)" if r.get("cache_hits") is not None else "")
                 for r in ok]
        parts += [f"{r['mode']}: {r['status']} ({r['reason'][:120]})" for r in rows if r["status"] != "ok"]
        name = "transformers" if runtime == "hf" else "llama.cpp"
        out.append(f"**Prompt cache ({name}, requests sharing a long prefix)**: " + "; ".join(parts) + ".")

    for r in _by_name(section, lambda r: r["scenario"] == "streaming"):
        m = r["_metrics"]
        if r["status"] != "ok":
            out.append(Missing(f"**Streaming** ({r['name']}): {r['status']}: {r['reason'][:160]}"))
            continue
        stream, plain = m.get("stream_e2e_ms", {}).get("median"), m.get("plain_e2e_ms", {}).get("median")
        out.append(f"**Streaming (transformers TextIteratorStreamer, {r.get('precision')} batch 1)**: the same "
                   f"{r['new_tokens']} tokens take {_f(stream, 'ms')} streamed against {_f(plain, 'ms')} without "
                   f"streaming ({_ratio(stream, plain)}); first text after {_f(r['ttft_ms'], 'ms')}.")
    stream = next((r for r in section.candidates if r["runtime"] == "llama_cpp"
                   and r.get("api") == "completion_stream"), None)
    if stream is not None:
        same = ("quant", "n_threads", "n_batch", "flash_attn", "kv_type", "prompt_tokens", "new_tokens")
        apis = {r["api"]: r for r in section.candidates if r["runtime"] == "llama_cpp"
                and all(r.get(k) == stream.get(k) for k in same)}
        parts = [f"{api}: {_f(r['total_tps'], 'tokens/s')} end to end, first token after {_f(r['ttft_ms'], 'ms')}"
                 for api, r in sorted(apis.items())]
        out.append(f"**Streaming (llama.cpp, {stream['quant']}, {stream['n_threads']} threads)**: "
                   + "; ".join(parts) + " (without streaming the first token reaches the client with the last).")
    return out


def decode_loops(section: Section) -> list[str]:
    """generate() against the fast and graph decode loops and the hand-written step, per precision and batch, best
    compile mode each."""
    out = []
    hf = [r for r in section.candidates if r["runtime"] == "hf" and r.get("attn") == "sdpa"]
    loops = [r for r in hf if not _generate(r)]
    for precision, batch in sorted({(r["precision"], r["batch_size"]) for r in loops}, key=str):
        same = [r for r in hf if r["precision"] == precision and r["batch_size"] == batch]
        parts = []
        for label, pick in (("generate, dynamic cache", lambda r: _generate(r) and r["kv_cache"] == "dynamic"),
                            ("generate, static cache + compile",
                             lambda r: _generate(r) and r.get("compile") is True),
                            ("fast loop", lambda r: r.get("decode") == "fast"),
                            ("CUDA-graph loop", lambda r: r.get("decode") == "graph"),
                            ("hand-written step", lambda r: r.get("decode") == "kernels")):
            rows = [r for r in same if pick(r)]
            if rows:
                best = max(rows, key=lambda r: r["decode_tps"] or 0)
                mode = (best.get("compile_mode") or "") if best.get("compile") is True else ""
                if best.get("decode") == "graph" and mode:  # the loop captures its own graph
                    mode = GRAPH_MODES.get(mode, mode).removesuffix("-no-cudagraphs") + " kernels"
                fused = ("fused block" if best.get("fuse_block") is True
                         else "fused q/k/v" if best.get("fuse_qkv") is True else "")
                notes = [n for n in (mode, best.get("inductor"), fused,
                                     "Triton GEMV" if best.get("gemv") == "triton" else "") if n]
                mode = f" ({', '.join(notes)})" if notes else ""
                parts.append(f"{label}{mode} {_f(best['decode_tps'], 'tokens/s')} per sequence "
                             f"({_f(best['total_tps'], 'tokens/s')} total, ITL p50 {_f(best['itl_p50_ms'], 'ms')}"
                             f"{_same_tokens(best, same)})")
        out.append(f"**Decode loop ({precision}, batch {int(batch)})**: " + "; ".join(parts) + ".")
    return out


def _same_tokens(row: dict[str, Any], same: list[dict[str, Any]]) -> str:
    """Whether a decode loop's measured requests generated the tokens generate() did for the same prompts (their
    digests, recorded in one sweep); nothing where either was not recorded."""
    plain = [r for r in same if _generate(r) and r["kv_cache"] == "dynamic" and r.get("output_digest")]
    if _generate(row) or not plain or not row.get("output_digest"):
        return ""
    if row["output_digest"] == plain[0]["output_digest"]:
        return "; the same tokens as generate()"
    return "; tokens differ from generate()'s for the same prompts (fp16 near-ties can flip a greedy token)"


HF_16, HF_8, HF_4 = SIXTEEN_BIT["hf"], ("int8", "int8-ao"), (*FOUR_BIT["hf"], *INT4_KERNELS)


def _hf_b1(precisions: tuple[str, ...]):
    """Which rows are transformers points at batch 1 in one of these precisions."""
    return lambda r: r["runtime"] == "hf" and r.get("batch_size") == 1 and r.get("precision") in precisions


def _best(rows: list[dict[str, Any]], key: str = "decode_tps") -> dict[str, Any] | None:
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key] or 0) if rows else None


def real_quality(sections: list[Section]) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """(runtime, precision or quant) -> (section title, quality row) of each format scored on real weights: the
    cost of a format where a section's own model has random weights (first section that scored it)."""
    out: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for s in sections:
        for q in s.scored:
            if (q.get("meaningful") and q.get("kl_mean") is not None and q.get("reference") != "itself"
                    and not q.get("loop")):
                out.setdefault((q.get("runtime"), q.get("precision") or q.get("quant")), (s.title, q))
                out.setdefault((q.get("runtime"), q.get("precision") or q.get("quant"), s.hardware), (s.title, q))
    return out


def _real(real: dict | None, runtime: str | None, kind: str | None, hardware: str) -> tuple | None:
    """The format's real-weights quality measured on this hardware if any, else the first found elsewhere."""
    real = real or {}
    return real.get((runtime, kind, hardware)) or real.get((runtime, kind))


def _groups(description: str | None) -> str:
    """The group sizes a quantization description names ("group sizes 32 (180 projections) and 128 (30)")."""
    found = re.search(r"group sizes? [0-9][^,;]*", description or "")
    return found.group(0) if found else ""


def _elsewhere(row: dict[str, Any], section: Section, real: dict | None) -> str:
    """Where the row's weights are random and its own quality unknown: the same format's figures on real weights
    (another model, perhaps another machine), labelled as such, with what each model's weights hold; else nothing."""
    if row.get("kl_mean") is not None or section.weights != "random" or not real:
        return ""
    found = _real(real, row["runtime"], _kind(row), section.hardware)
    if found is None:
        return ""
    from inferlab.report.render import quality_text

    title, q = found
    there, here = _groups(q.get("holds")), _groups((row.get("_metrics") or {}).get("quantization"))
    held = f"; there {there}, here {here}" if there and here and there != here else ""
    where = "another model" if q.get("hardware") == section.hardware else "another model and machine"
    return (f" The same format on real weights ({_kind(row)}, {title}, evaluate stage{held}; {where}, so what the "
            f"format costs there, not this configuration's own figure): {quality_text(q)}.")


def same_format_elsewhere(rcm: dict[str, Any], section: Section, real: dict | None) -> str:
    """For a recommendation on random weights: the recommended format's quality on real weights, labelled as
    another model's (and machine's), or that no real-weights figure exists for it."""
    from inferlab.report.render import quality_text

    settings = rcm.get("settings") or {}
    kind = settings.get("precision") or settings.get("quant")
    found = _real(real, settings.get("runtime"), kind, section.hardware)
    if found is None:
        return f"; the same format ({kind}) was not scored on real weights"
    title, q = found
    where = "another model" if q.get("hardware") == section.hardware else "another model and machine"
    return f"; the same format on real weights ({kind}, {title}: {where}): {quality_text(q)}"


def faster_decoding(section: Section, real: dict | None = None) -> list[str]:
    """The peer runtime on the same GPU (llama.cpp with every layer offloaded), the best batch-1 figures of
    transformers at 16 and 4 bits (with the 4-bit format's quality on real weights where this model's are random:
    `real`, from real_quality), and prompt-lookup decoding against plain decoding of the same requests."""
    out: list[str] = []
    gpu_llama = [r for r in section.rows if r["runtime"] == "llama_cpp" and r["device"] == "cuda"
                 and r["scenario"] == "latency"]
    fp16 = _best([r for r in section.candidates if _hf_b1(HF_16)(r)])
    q4 = _best([r for r in section.candidates if _hf_b1(HF_4)(r)])
    if fp16 is not None and q4 is not None and not _generate(fp16):
        out.append(f"**Fastest batch-1 decoding (transformers)**: 16-bit {fp16['name']} "
                   f"{_f(fp16['decode_tps'], 'tokens/s')} (ITL p50 {_f(fp16['itl_p50_ms'], 'ms')}); 4-bit "
                   f"{q4['name']} {_f(q4['decode_tps'], 'tokens/s')} (ITL p50 {_f(q4['itl_p50_ms'], 'ms')}), "
                   f"{_ratio(q4['decode_tps'], fp16['decode_tps'])} the 16-bit speed in "
                   f"{_f(q4['memory_gib'], 'GiB')} against {_f(fp16['memory_gib'], 'GiB')}; the 4-bit's KL divergence "
                   f"from full precision {_f(q4.get('kl_mean'), 'nats/token')} (16-bit: "
                   f"{_f(fp16.get('kl_mean'), 'nats/token')}), top-1 agreement {_f(q4.get('top1'))}, perplexity "
                   f"ratio {_f(q4.get('ppl_ratio'))}." + _elsewhere(q4, section, real))
    if gpu_llama:
        ok = [r for r in gpu_llama if r["status"] == "ok"]
        if ok:
            parts = [f"{r['quant']}{' (flash attention)' if r.get('flash_attn') is True else ''} "
                     f"{_f(r['decode_tps'], 'tokens/s')}, TTFT {_f(r['ttft_ms'], 'ms')}, {_f(r['memory_gib'], 'GiB')}"
                     for r in sorted(ok, key=lambda r: str(r["quant"]))]
            out.append("**llama.cpp on this GPU (every layer offloaded, same GGUF files)**: " + "; ".join(parts) + ".")
            peer = []
            for label, ours, kinds in (("16-bit", fp16, SIXTEEN_BIT["llama_cpp"]),
                                       ("4-bit", q4, FOUR_BIT["llama_cpp"])):
                theirs = _best([r for r in ok if r.get("quant") in kinds])
                if ours is not None and theirs is not None:
                    peer.append(f"{label} {_f(ours['decode_tps'], 'tokens/s')} against llama.cpp's "
                                f"{theirs['quant']} {_f(theirs['decode_tps'], 'tokens/s')} "
                                f"({_ratio(ours['decode_tps'], theirs['decode_tps'])})")
            if peer:
                out.append("**transformers' fastest against llama.cpp's, batch 1**: " + "; ".join(peer) + ".")
        failed = [r for r in gpu_llama if r["status"] != "ok"]
        if failed:
            reasons = "; ".join(sorted({r["reason"].splitlines()[0][:140] for r in failed}))
            if ok:
                out.append(f"**llama.cpp on this GPU, points that did not run**: {len(failed)} of "
                           f"{len(gpu_llama)}: {reasons}.")
            else:
                out.append(Missing(f"**llama.cpp on this GPU (every layer offloaded, same GGUF files)**: none of "
                                   f"its {len(gpu_llama)} points ran: {reasons}."))
    lookup = [r for r in section.rows if r["scenario"] == "assisted" and r["status"] == "ok"]
    plain = {(r.get("precision"), r.get("task")): r for r in lookup if r.get("lookup_tokens") == 0}
    for r in lookup:
        if not r.get("lookup_tokens"):
            continue
        m, base = r["_metrics"], plain.get((r.get("precision"), r.get("task")))
        n = int(r["lookup_tokens"] or 0)
        text = (f"**Prompt lookup ({r.get('precision')}, {r.get('task')}, {n} candidates)**: "
                f"{_f(r['total_tps'], 'tokens/s')} per request (median of {m.get('requests')}), acceptance "
                f"{_f(m.get('acceptance_rate'))}, {_f(m.get('tokens_per_forward', {}).get('median'))} tokens per "
                "forward pass")
        if base is not None:
            same = m.get("outputs_sha256") == base["_metrics"].get("outputs_sha256")
            each, base_each = m.get("outputs_sha256_each"), base["_metrics"].get("outputs_sha256_each")
            if each and base_each and len(each) == len(base_each):
                agree = f"{sum(a == b for a, b in zip(each, base_each))} of {len(each)} requests"
            else:
                agree = "every request" if same else "not every request (which ones was not recorded)"
            text += (f"; plain decoding of the same requests {_f(base['total_tps'], 'tokens/s')} "
                     f"({_ratio(r['total_tps'], base['total_tps'])} faster); the same tokens as plain decoding in "
                     f"{agree}")
        out.append(text + ".")
    return out


PROFILE_COLUMNS = (("name", "profiled configuration"), ("sweep", "sweep"), ("window", "window"),
                   ("profiled_step_ms", "step ms"),
                   ("kernel_ms_per_step", "kernels ms"), ("launch_gap_ms_per_step", "launch gaps ms"),
                   ("host_wait_ms_per_step", "host waits ms"), ("kernels_per_step", "kernels/step"),
                   ("matmul_ms", "matmul ms"), ("weight_gbps_over_matmul", "weights GB/s in matmuls"),
                   ("top_kernel", "largest kernel (ms/step)"))


def profiles(section: Section) -> list[dict[str, Any]]:
    """One row per kernel-level profile of decode steps (the profile scenario)."""
    rows = []
    for r in section.rows:
        if r["scenario"] != "profile" or r["status"] != "ok":
            continue
        m = r["_metrics"]
        top = (m.get("top_kernels") or [{}])[0]
        matmul, gbps = (m.get("ms_per_step_by_kind") or {}).get("matmul"), m.get("weight_gbps_over_matmul")
        device_gbps = (m.get("bandwidth") or {}).get("bandwidth_gbps")
        if gbps and device_gbps and gbps > 1.1 * device_gbps:  # the weights were read by kernels not classed as
            gbps = None  # matrix kernels (inductor's fused reductions): no rate to give
        rows.append({"name": r["name"].removesuffix("-profile"), "sweep": r.get("sweep_id"), "window": m.get("window"),
                     **{k: m.get(k) for k in ("profiled_step_ms", "kernel_ms_per_step", "launch_gap_ms_per_step",
                                              "host_wait_ms_per_step", "kernels_per_step")},
                     "matmul_ms": matmul,
                     "weight_gbps_over_matmul": gbps,
                     "top_kernel": f"{top.get('name', '')[:48]} ({top.get('ms_per_step', '')})" if top else ""})
    return rows


# (kind, which latency points, the figure that ranks them): the fastest of each kind in each sweep
KINDS_SIDE_BY_SIDE = (
    ("transformers, 16-bit, batch 1", _hf_b1(HF_16), "decode_tps"),
    ("transformers, 8-bit, batch 1", _hf_b1(HF_8), "decode_tps"),
    ("transformers, 4-bit, batch 1", _hf_b1(HF_4), "decode_tps"),
    ("llama.cpp, 16-bit", lambda r: r["runtime"] == "llama_cpp" and r.get("quant") in SIXTEEN_BIT["llama_cpp"],
     "decode_tps"),
    ("llama.cpp, 8-bit", lambda r: r["runtime"] == "llama_cpp" and r.get("quant") == "q8_0", "decode_tps"),
    ("llama.cpp, 4-bit", lambda r: r["runtime"] == "llama_cpp" and r.get("quant") in FOUR_BIT["llama_cpp"],
     "decode_tps"),
    ("transformers, batch > 1 (total tokens/s)", lambda r: r["runtime"] == "hf" and (r.get("batch_size") or 1) > 1,
     "total_tps"),
)


def side_by_side(section: Section) -> tuple[list[str], list[list[str]]]:
    """The fastest configuration of each kind (transformers at 16, 8 and 4 bits, the peer llama.cpp, batching) in
    each sweep, one row per sweep (the ranked sweep first, then newest first): (column titles, rows). A row holds
    what was measured together; down a column, how a kind moved between sweeps. Empty unless two or more sweeps
    measured something."""
    if not section.history:
        return [], []
    device = "cuda" if any(r["device"] == "cuda" for r in section.ok()) else "cpu"  # a GPU host's CPU sweep: not here
    rows, kinds = [], set()
    for g in section.groups:
        cands = [r for r in section.view(g).candidates if r["device"] == device]
        found = {}
        for kind, which, key in KINDS_SIDE_BY_SIDE:
            best = _best([r for r in cands if which(r)], key)
            if best is not None:
                found[kind] = f"{_f(best[key])} ({best['name']})"
        if found:
            rows.append((section.label(g), found))
            kinds.update(found)
    if len(rows) < 2:
        return [], []
    order = [kind for kind, _, _ in KINDS_SIDE_BY_SIDE if kind in kinds]
    return ["sweep", *order], [[label, *(found.get(k, "") for k in order)] for label, found in rows]
