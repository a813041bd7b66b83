"""The study's answer in a few lines, from the recommendation document: the machine and model just
studied first, then one line per other (machine, model) with records. `inferlab study` ends with
it; the report run's description in MLflow is it."""

from __future__ import annotations

from typing import Any

OTHER_REASON_CHARS = 100  # another machine's "no recommendation" reason, cut: the report has it


def studied_first(document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the studied machine and model's recommendation or None, every other one in order)."""
    studied = document.get("studied") or {}
    key = (studied.get("hardware"), studied.get("model"))
    recs = document.get("recommendations", [])
    mine = next((r for r in recs if (r["hardware"], r["model"]) == key), None)
    return mine, [r for r in recs if r is not mine]


def _figures(r: dict[str, Any]) -> str:
    f, s = r.get("figures") or {}, r.get("settings") or {}
    setting = ", ".join(f"{k}={v}" for k, v in sorted(s.items()) if v not in (None, ""))
    scored = f.get("kl_mean") is not None and f.get("top1") is not None
    quality = (f"KL {f['kl_mean']:.3g} nats/token, top-1 {100 * f['top1']:.1f}%" if scored
               else "quality not measured")
    tps = f.get("total_tps")
    speed = f"{tps:,.1f} tokens/s" if tps is not None else "speed not measured"
    memory = f", {f['memory_gib']:.2f} GiB" if f.get("memory_gib") is not None else ""
    return f"{r['name']} ({setting}): {speed}{memory}, {quality}"


def _short(r: dict[str, Any]) -> str:
    if r.get("status") == "recommended":
        tps = (r.get("figures") or {}).get("total_tps")
        return f"{r['name']}" + (f" ({tps:,.1f} tokens/s)" if tps is not None else "")
    reason = r.get("reason") or ""
    cut = reason[:OTHER_REASON_CHARS] + ("…" if len(reason) > OTHER_REASON_CHARS else "")
    return f"no recommendation ({cut})" if cut else "no recommendation"


def lines(document: dict[str, Any]) -> list[str]:
    """The answer: the studied (machine, model) in full, then each other one in a line."""
    studied = document.get("studied") or {}
    mine, others = studied_first(document)
    where = f"{studied.get('model')} on {studied.get('hardware')}"
    if mine is None:
        out = [f"No records of {where} (this machine, the model studied) yet."] if studied else []
    elif mine.get("status") == "recommended":
        out = [f"The answer for {where} (this machine, the model studied): the fastest "
               "configuration that meets the constraints is", f"  {_figures(mine)}"]
    else:
        out = [f"The answer for {where} (this machine, the model studied): no recommendation: "
               f"{mine.get('reason', '')}"]
    if others:
        out.append("Other machines and models with records (history, in the report after this "
                   "run's section):")
        out += [f"  {r['model']} on {r['hardware']}: {_short(r)}" for r in others]
    return out
