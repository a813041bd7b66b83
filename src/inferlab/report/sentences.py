"""Comparisons and quality figures in words: the last step, never read back."""

from __future__ import annotations

from typing import Any

from inferlab.report.comparisons import Borrowed, Comparison, Side, real_for
from inferlab.report.sweeps import Shown
from inferlab.report.table import Section, fmt


def _f(v: Any, unit: str = "") -> str:
    return "not measured" if v is None or v != v else f"{fmt(v)} {unit}".rstrip()


def _tps(v: Any) -> str:
    return _f(v, "tokens/s")


def _ms(v: Any) -> str:
    return _f(v, "ms")


def _gib(v: Any) -> str:
    return _f(v, "GiB")


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}×" if a is not None and a == a and b else "n/a"


def with_ci(v: Any, low: Any, high: Any, kind: str = "") -> str:
    """A figure and its 95% interval in one cell: 0.0123 (0.0119–0.0127); kind "pct" as
    percentages, "ratio" to four decimals (a perplexity ratio near 1)."""
    if v is None or v == "":
        return ""
    f = {"pct": lambda x: f"{100 * x:.1f}%", "ratio": lambda x: f"{x:.4f}"}.get(kind, fmt)
    return f"{f(v)} ({f(low)}–{f(high)})" if low is not None and high is not None else f(v)


def quality_text(f: dict[str, Any]) -> str:
    """A configuration's quality in words, each figure with its 95% interval."""
    kl = with_ci(f.get("kl_mean"), f.get("kl_ci_low"), f.get("kl_ci_high")) or "—"
    top1 = with_ci(f.get("top1"), f.get("top1_ci_low"), f.get("top1_ci_high"), "pct") or "—"
    low, high = f.get("ppl_ratio_ci_low"), f.get("ppl_ratio_ci_high")
    ratio = with_ci(f.get("ppl_ratio"), low, high, "ratio") or "—"
    return (f"KL divergence from full precision {kl} nats per token, top-1 agreement {top1}, "
            f"perplexity ratio {ratio}")


def _speed(c: Comparison) -> str:
    if not c.made:
        return (f"{c.missing} configuration was not measured here, so 16-bit vs 4-bit cannot be "
                "compared.")
    q4, base = c.sides
    a, b = q4.figures, base.figures
    return (f"{q4.label} decodes {_tps(a['decode_tps'])} against {base.label}'s "
            f"{_tps(b['decode_tps'])} ({_ratio(a['decode_tps'], b['decode_tps'])} the speed); "
            f"TTFT {_ms(a['ttft_ms'])} vs {_ms(b['ttft_ms'])}.")


def _memory(c: Comparison) -> str:
    q4, base = c.sides
    a, b = q4.figures["memory_gib"], base.figures["memory_gib"]
    return (f"{q4.label} peaks at {_gib(a)} ({q4.notes[0]}) against {_gib(b)} for {base.label} "
            f"({_ratio(a, b)}).")


def _batching(c: Comparison) -> str:
    if not c.made:
        return f"{c.sides[0].label} ran at batch 1 only here."
    big, one, *same_batch = c.sides
    f, one_tps = big.figures, one.figures["total_tps"]
    out = (f"{big.label} at batch {c.settings['batch']} delivers {_tps(f['total_tps'])} in total "
           f"against {_tps(one_tps)} at batch 1 ({_ratio(f['total_tps'], one_tps)}), "
           f"each sequence at {_tps(f['decode_tps'])}, in {_gib(f['memory_gib'])}")
    for base in same_batch:
        b = base.figures
        out += (f"; {base.label} at the same batch: {_tps(b['total_tps'])} in "
                f"{_gib(b['memory_gib'])}, so batched 4-bit reaches "
                f"{_ratio(f['total_tps'], b['total_tps'])} of its throughput")
    return out + "."


def _speed_parts(s: Side) -> str:
    f = s.figures
    return f"{_tps(f['decode_tps'])}, TTFT {_ms(f['ttft_ms'])}, {_gib(f['memory_gib'])}"


def _kv_cache(c: Comparison) -> str:
    dyn, *others = c.sides
    base = dyn.figures["decode_tps"]
    parts = [f"{s.label} {_tps(s.figures['decode_tps'])} "
             f"({_ratio(s.figures['decode_tps'], base)}), TTFT {_ms(s.figures['ttft_ms'])}, "
             f"{_gib(s.figures['memory_gib'])}" for s in others]
    return f"{dyn.label} {_speed_parts(dyn)}; " + "; ".join(parts) + "."


TOKENS = {True: "; the same tokens as generate()", None: "",
          False: "; tokens differ from generate()'s for the same prompts "
                 "(fp16 near-ties can flip a greedy token)"}


def _decode_loop(c: Comparison) -> str:
    parts = []
    for s in c.sides:
        f = s.figures
        notes = f" ({', '.join(s.notes)})" if s.notes else ""
        parts.append(f"{s.label}{notes} {_tps(f['decode_tps'])} per sequence "
                     f"({_tps(f['total_tps'])} total, ITL p50 {_ms(f['itl_p50_ms'])}"
                     f"{TOKENS[s.same_tokens]})")
    return "; ".join(parts) + "."


def _llama_kv(c: Comparison) -> str:
    (s,) = c.sides
    if not c.made:
        return f"({s.name}): {c.missing}"
    return f"({s.name}): {_tps(s.figures['decode_tps'])}, {_gib(s.figures['memory_gib'])}."


def _prompt_cache(c: Comparison) -> str:
    parts = []
    for s in c.sides:
        if s.status != "ok":
            parts.append(f"{s.label}: {s.status} ({s.reason})")
            continue
        hits = s.figures.get("cache_hits")
        parts.append(f"{s.label}: TTFT {_ms(s.figures['ttft_ms'])}"
                     + (f" ({_f(hits)} cache hits)" if hits is not None else ""))
    return "; ".join(parts) + "."


def _streaming(c: Comparison) -> str:
    if not c.made:
        return f"({c.sides[0].name}): {c.missing}"
    streamed, plain = c.sides
    a, b = streamed.figures["e2e_ms"], plain.figures["e2e_ms"]
    return (f"the same {c.settings['new_tokens']} tokens take {_ms(a)} streamed against {_ms(b)} "
            f"without streaming ({_ratio(a, b)}); first text after "
            f"{_ms(streamed.figures['ttft_ms'])}.")


def _llama_streaming(c: Comparison) -> str:
    parts = [f"{s.label}: {_tps(s.figures['total_tps'])} end to end, first token after "
             f"{_ms(s.figures['ttft_ms'])}" for s in c.sides]
    return "; ".join(parts) + (" (without streaming the first token reaches the client with the "
                               "last).")


def _fastest(c: Comparison) -> str:
    sixteen, four = c.sides
    a, b = sixteen.figures, four.figures
    out = (f"16-bit {sixteen.name} {_tps(a['decode_tps'])} (ITL p50 {_ms(a['itl_p50_ms'])}); "
           f"4-bit {four.name} {_tps(b['decode_tps'])} (ITL p50 {_ms(b['itl_p50_ms'])}), "
           f"{_ratio(b['decode_tps'], a['decode_tps'])} the 16-bit speed in "
           f"{_gib(b['memory_gib'])} against {_gib(a['memory_gib'])}; the 4-bit's KL divergence "
           "from full precision "
           f"{_f(b['kl_mean'], 'nats/token')} (16-bit: {_f(a['kl_mean'], 'nats/token')}), "
           f"top-1 agreement {_f(b['top1'])}, perplexity ratio {_f(b['ppl_ratio'])}.")
    return out + (_borrowed(c.borrowed) if c.borrowed else "")


def _borrowed(r: Borrowed) -> str:
    held = f"; there {r.held_there}, here {r.held_here}" if r.held_there else ""
    where = "another model and machine" if r.other_machine else "another model"
    return (f" The same format on real weights ({r.kind}, {r.title}, evaluate stage{held}; "
            f"{where}, so what the format costs there, not this configuration's own figure): "
            f"{quality_text(r.quality)}.")


def _llama_gpu(c: Comparison) -> str:
    if not c.made:
        return f"none of its {c.figures['points']} points ran: {c.missing}."
    flash = {True: " (flash attention)", False: ""}
    return "; ".join(f"{s.label}{flash[bool(s.notes)]} {_speed_parts(s)}" for s in c.sides) + "."


def _peer(c: Comparison) -> str:
    parts = []
    for ours, theirs in zip(c.sides[::2], c.sides[1::2]):
        a, b = ours.figures["decode_tps"], theirs.figures["decode_tps"]
        parts.append(f"{ours.label} {_tps(a)} against llama.cpp's {theirs.label} {_tps(b)} "
                     f"({_ratio(a, b)})")
    return "; ".join(parts) + "."


def _not_run(c: Comparison) -> str:
    return f"{c.figures['failed']} of {c.figures['points']}: {c.settings['reasons']}."


def _lookup(c: Comparison) -> str:
    f = c.sides[0].figures
    out = (f"{_tps(f['total_tps'])} per request (median of {f['requests']}), acceptance "
           f"{_f(f['acceptance'])}, {_f(f['tokens_per_forward'])} tokens per forward pass")
    if len(c.sides) > 1:
        base = c.sides[1].figures["total_tps"]
        if "agreeing" in c.figures:
            agree = f"{c.figures['agreeing']} of {c.figures['compared']} requests"
        else:
            agree = ("every request" if c.figures["all_agree"]
                     else "not every request (which ones was not recorded)")
        out += (f"; plain decoding of the same requests {_tps(base)} "
                f"({_ratio(f['total_tps'], base)} faster); the same tokens as plain decoding in "
                f"{agree}")
    return out + "."


WORDS = {"speed": _speed, "memory": _memory, "batching": _batching, "kv_cache": _kv_cache,
         "decode_loop": _decode_loop, "llama_kv": _llama_kv, "prompt_cache": _prompt_cache,
         "streaming": _streaming, "llama_streaming": _llama_streaming, "fastest": _fastest,
         "llama_gpu": _llama_gpu, "peer": _peer, "not_run": _not_run, "lookup": _lookup}
TIGHT = ("llama_kv", "streaming")  # "**topic** (point): ...": the sentence opens with its point


def comparison_text(c: Comparison) -> str:
    sep = " " if c.kind in TIGHT and (c.kind != "streaming" or not c.made) else ": "
    return f"**{c.topic}**{sep}{WORDS[c.kind](c)}"


def sentence(shown: Shown) -> str:
    """A shown comparison as one markdown sentence, with the sweep it was made in."""
    c = shown.comparison
    if shown.apart and c.made:
        return (f"**{c.topic}**: its points were measured only in different sweeps or on "
                "different machine instances: not compared.")
    text = comparison_text(c)
    if shown.apart:
        return text + (" (Both sides were measured, but never in one sweep on one machine "
                       "instance: not compared across sweeps.)")
    if shown.group is None:
        return text
    also = f"; the same comparison in {shown.same_in} other sweep(s)" if shown.same_in else ""
    if shown.others_in:
        also += f"; {shown.others_in} more sweep(s) compared other configurations"
    return f"{text} _({Section.label(shown.group)}{also})_"


def same_format_elsewhere(rcm: dict[str, Any], section: Section, real: dict | None) -> str:
    """For a recommendation on random weights: the recommended format's quality on real weights,
    labelled as another model's (and machine's), or that none was scored."""
    settings = rcm.get("settings") or {}
    kind = settings.get("precision") or settings.get("quant")
    found = real_for(real, settings.get("runtime"), kind, section.hardware)
    if found is None:
        return f"; the same format ({kind}) was not scored on real weights"
    title, q = found
    same = q.get("hardware") == section.hardware
    where = "another model" if same else "another model and machine"
    return f"; the same format on real weights ({kind}, {title}: {where}): {quality_text(q)}"
