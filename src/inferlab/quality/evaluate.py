"""Stage `evaluate`: what each configuration costs in quality.

Each configuration (transformers precision x KV cache per device, llama.cpp quant x KV type)
runs in a worker and measures per-token quality against its runtime's full-precision reference
(`inferlab.quality.tokens`) and greedy task outputs, stored under results/evaluate/outputs/.
Scoring reads the stored outputs: task quality against the references, and drift against the
reference configuration's outputs (how much the text changed, not whether it got worse).
Points that cannot run here are recorded as skipped; random weights are scored, marked so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from inferlab import records as rec
from inferlab.aggregate import NOT_MEANINGFUL, hardware_of, stage_records, write_aggregates
from inferlab.bench import grid, registry
from inferlab.config import DECODE_LOOPS, ConfigError, EvalHF, StudyConfig, loop_path, resolve, usable_cores
from inferlab.environment import cuda_problem, missing_package
from inferlab.fields import VS_REFERENCE, VS_TRANSFORMERS
from inferlab.quality import dataset, tokens
from inferlab.quality.scores import BertScorer, compare, exact_match, mean_of, token_fidelity
from inferlab.stage import StageRun
from inferlab.sweep.points import Point
from inferlab.sweep.run import run_sweep

log = logging.getLogger(__name__)

STAGE = "evaluate"
PINS = ("runtime", "precision", "quant", "kv_cache", "kv_type")  # select evaluation configurations


def outputs_dir(cfg: StudyConfig, hardware: str, model: str | None = None) -> Path:
    """results/evaluate/outputs/<hardware>/<model>/: one JSONL file per configuration."""
    return resolve(cfg.paths.results) / STAGE / "outputs" / hardware / (model or cfg.model.name)


def reference_dir(cfg: StudyConfig, hardware: str) -> Path:
    """models/<model>/reference/<hardware>/: next-token distributions (a DVC output, not git)."""
    return resolve(cfg.paths.models) / cfg.model.name / "reference" / hardware


def _keep(settings: dict[str, Any], pins: dict[str, Any]) -> bool:
    return all(settings.get(k) == v for k, v in pins.items() if k in settings)


def tokenize(
    cfg: StudyConfig, items: list[dataset.Item], text: str
) -> tuple[list[dict[str, Any]], list[int]]:
    """Prompt ids and held-out text ids, made once so every runtime reads the same ids.

    Tasks in evaluate.chat go through the chat template when the tokenizer has one."""
    from transformers import AutoTokenizer

    e = cfg.evaluate
    tok = AutoTokenizer.from_pretrained(cfg.model_dir() / "hf")
    chat = bool(getattr(tok, "chat_template", None))
    payload = []
    for i in items:
        text_prompt = dataset.prompt(i, e.templates)
        if chat and e.chat.get(i.task, False):
            messages = [{"role": "user", "content": text_prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tok(text_prompt, add_special_tokens=False)["input_ids"]
        payload.append({**asdict(i), "prompt": text_prompt, "prompt_ids": [int(t) for t in ids],
                        "chat": chat and e.chat.get(i.task, False)})
    token_ids = [int(t) for t in tok(text, add_special_tokens=False, verbose=False)["input_ids"]]
    if len(token_ids) - 1 < e.tokens.min_tokens:
        raise ConfigError(
            f"evaluate.tokens.text: {e.tokens.text} gives {len(token_ids) - 1:,} scored tokens with "
            f"the tokenizer of {cfg.model.name}; at least evaluate.tokens.min_tokens="
            f"{e.tokens.min_tokens:,} are needed: add held-out text or lower min_tokens"
        )
    return payload, token_ids


def _ref_identity(cfg: StudyConfig, hardware: str, config: str, token_ids: list[int]) -> dict:
    t = cfg.evaluate.tokens
    return {
        "method": tokens.METHOD_VERSION, "model": cfg.model.name, "hardware": hardware,
        "config": config, "ids": tokens.ids_digest(token_ids), "window": t.window, "stride": t.stride,
    }


def generation_points(
    cfg: StudyConfig, items: list[dict[str, Any]], token_ids: list[int], items_digest: str,
    hardware: str, cuda_problem: str | None,
) -> list[Point]:
    """Every configuration to evaluate, each runtime's reference first.

    A reference runs even where pins leave it out: the others are compared with it."""
    e = cfg.evaluate
    pins = cfg.pins(PINS)
    runtime = pins.pop("runtime", None)
    common = {
        "scenario": "quality", "items_digest": items_digest, "n_items": len(items),
        "max_new_tokens": dict(e.max_new_tokens), "tokens_digest": tokens.ids_digest(token_ids),
        "tokens_window": e.tokens.window, "tokens_stride": e.tokens.stride,
    }
    load = {
        "items": items, "outputs_dir": str(outputs_dir(cfg, hardware)), "token_ids": token_ids,
        "tokens_window": e.tokens.window, "tokens_stride": e.tokens.stride,
        "reference_dir": str(reference_dir(cfg, hardware)),
    }
    cores = usable_cores()
    families: list[list[Point]] = []
    hf_cpu_ref: dict[str, Any] | None = None
    if runtime in (None, "hf"):
        for device, section in (("cuda", e.gpu), ("cpu", e.cpu)):
            if not section.enabled:
                continue
            ref_kv = section.kv_cache[0]
            ref_name = f"hf-{device}-{section.reference}-{ref_kv}"
            ref_ident = _ref_identity(cfg, hardware, ref_name, token_ids)
            vs_ref = {"writes_reference": None, "against": {VS_REFERENCE: {"identity": ref_ident}}}
            threads = cores if device == "cpu" else 0
            no_cuda = cuda_problem if device == "cuda" else None
            family: list[Point] = []
            for precision in dict.fromkeys([section.reference, *section.precisions]):
                for kv in section.kv_cache:
                    name = f"hf-{device}-{precision}-{kv}"
                    is_ref = name == ref_name
                    settings = {
                        **common, "device": device, "precision": precision, "kv_cache": kv,
                        "attn": "sdpa", "compile": False, "compute_dtype": section.compute_dtype,
                        "batch_size": section.batch_size, "threads": threads,
                    }
                    if not is_ref and not _keep(settings, pins):
                        continue
                    skip = no_cuda or missing_package(precision)
                    roles = {"writes_reference": ref_ident, "against": {}} if is_ref else vs_ref
                    family.append(Point(
                        name, "hf", ("hf", device, precision), settings,
                        {**load, **roles, "model_dir": str(cfg.model_dir() / "hf")}, skip,
                    ))
            for p in loop_points(cfg, device, section, cores):
                loop_settings = {k: v for k, v in p.settings.items() if k in LOOP_SETTINGS}
                settings = {
                    **common, **loop_settings, "device": device, "loop": loop_path(p.settings),
                    "threads": threads,
                }
                if not _keep(settings, pins):
                    continue
                skip = no_cuda or p.skip
                roles = vs_ref
                family.append(Point(
                    f"hf-{device}-{p.name.removeprefix('hf-')}", "hf", p.group, settings,
                    {**load, **roles, "model_dir": str(cfg.model_dir() / "hf")}, skip,
                ))
            if len(family) > 1 or any(_keep(p.settings, pins) for p in family):
                families.append(family)
                if device == "cpu" and not family[0].skip:
                    hf_cpu_ref = ref_ident
    L = e.llama_cpp
    if runtime in (None, "llama_cpp") and L.enabled:
        ref_name = f"llama-{L.reference}-kv{L.kv_type[0]}"
        ref_ident = _ref_identity(cfg, hardware, ref_name, token_ids)
        vs_ref = {"writes_reference": None, "against": {VS_REFERENCE: {"identity": ref_ident}}}
        family = []
        for quant in dict.fromkeys([L.reference, *L.quants]):
            for kv in L.kv_type:
                if kv != L.kv_type[0] and L.kv_quants and quant not in L.kv_quants:
                    continue
                name = f"llama-{quant}-kv{kv}"
                is_ref = name == ref_name
                settings = {
                    **common, "quant": quant, "kv_type": kv, "flash_attn": kv != "f16",
                    "n_threads": L.n_threads or cores, "n_batch": 512, "n_ctx": L.n_ctx,
                    "logits_all": True, "batch_size": 1,
                }
                if L.n_gpu_layers:  # only then: the CPU points keep their ids
                    settings["n_gpu_layers"] = L.n_gpu_layers
                if not is_ref and not _keep(settings, pins):
                    continue
                path, skip = cfg.gguf_path(quant), cfg.missing_gguf(quant)
                if is_ref:
                    against = {VS_TRANSFORMERS: {"identity": hf_cpu_ref}} if hf_cpu_ref else {}
                    roles = {"writes_reference": ref_ident, "against": against}
                else:
                    roles = vs_ref
                family.append(Point(name, "llama_cpp", ("llama_cpp", quant), settings,
                                    {**load, **roles, "model_path": str(path)}, skip))
        if len(family) > 1 or any(_keep(p.settings, pins) for p in family):
            families.append(family)
    # references first (llama.cpp's after transformers' CPU one: it is compared with it)
    refs = [f[0] for f in families]
    return refs + [p for f in families for p in f[1:]]


# what a decode loop's benchmark point ran with, and so what its quality is scored through
LOOP_SETTINGS = (
    "precision", "batch_size", "kv_cache", "attn", "compile", "compile_mode", "compute_dtype",
    "decode", "inductor", "fuse_qkv", "fuse_block", "gemv", "int4_gemv", "fuse_norm", "fuse_attention",
)


def loop_points(cfg: StudyConfig, device: str, section: EvalHF, cores: int) -> list[Point]:
    """Decode-loop points scored through their step: `section.loops`, or (None) the grid's."""
    bench = cfg.bench_gpu if device == "cuda" else cfg.bench_cpu
    if section.loops is not None:
        if not section.loops:
            return []
        hf = replace(bench.hf, device=device, batch_sizes=[1], kv_cache=["static"],
                     compile=[False], extra_points=section.loops)
        bench = SimpleNamespace(hf=hf, workload=bench.workload)
    points = grid.hf_points(bench, cfg.model_dir() / "hf", {}, cores)
    return [p for p in points if p.settings.get("decode") in DECODE_LOOPS]


def _family(p: dict[str, Any]) -> tuple:
    return ("hf", p.get("device")) if p.get("runtime") == "hf" else ("llama_cpp",)


def _config_of(p: dict[str, Any]) -> tuple:
    if p.get("runtime") == "hf":
        return (p.get("precision"), p.get("kv_cache"))
    return (p.get("quant"), p.get("kv_type"))


def reference_config(cfg: StudyConfig, point: dict[str, Any]) -> tuple:
    e = cfg.evaluate
    if point.get("runtime") == "hf":
        section = e.gpu if point.get("device") == "cuda" else e.cpu
        return (section.reference, section.kv_cache[0])
    return (e.llama_cpp.reference, e.llama_cpp.kv_type[0])


def _generations(cfg: StudyConfig, recs: list[rec.Record]) -> list[rec.Record]:
    """The latest generation of each configuration per hardware, for this model.

    An outputs file is named after its configuration, so a newer generation overwrites an
    older one's: only the latest of a name can be scored."""
    model = cfg.model.name
    mine = [r for r in recs if r.point.get("scenario") == "quality" and r.model.get("name") == model]

    def key(r: rec.Record) -> tuple:
        return (hardware_of(r), r.name)

    return sorted(rec.latest(mine, key), key=key)


def _outputs(cfg: StudyConfig, r: rec.Record) -> list[dict[str, Any]]:
    path = outputs_dir(cfg, hardware_of(r), r.model.get("name")) / r.metrics["outputs_file"]
    if not path.exists():
        raise FileNotFoundError(
            f"the outputs file {path} of {r.name} on {hardware_of(r)} is missing"
        )
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != r.metrics.get("outputs_sha256"):
        raise ValueError(
            f"{path} does not match the checksum its generation record holds (rewritten since?)"
        )
    return [json.loads(line) for line in blob.decode().splitlines() if line.strip()]


def score(cfg: StudyConfig, stage: StageRun, bert: BertScorer) -> int:
    """Score every generation of this model not scored yet with the same reference and scorer."""
    recs = stage_records(resolve(cfg.paths.results), STAGE)
    done = {r.point_id for r in recs if r.point.get("scenario") == "scores" and r.status == "ok"}
    made = 0
    ok = [g for g in _generations(cfg, recs) if g.status == "ok" and g.metrics.get("outputs_file")]
    for n, g in enumerate(ok, 1):
        hw = hardware_of(g)
        wanted = reference_config(cfg, g.point)
        # drift compares outputs made together: the reference configuration of the same sweep
        ref = next((
            r for r in ok if r.sweep_id == g.sweep_id and _family(r.point) == _family(g.point)
            and _config_of(r.point) == wanted
            and r.point.get("items_digest") == g.point.get("items_digest")
        ), None)
        keys = ("runtime", "device", "precision", "kv_cache", "quant", "kv_type", "batch_size")
        point = {
            "scenario": "scores", "of": g.name, "of_point": g.point_id, "of_hardware": hw,
            "generation_record": g.record_id, "reference_record": ref.record_id if ref else None,
            "reference": "-".join(map(str, wanted)), "scorer": bert.info(),
            **{k: g.point[k] for k in keys if k in g.point},
        }
        if rec.point_id(STAGE, {"model": stage.model["name"], **point}) in done:
            continue
        log.info("[%d/%d] scoring %s from %s", n, len(ok), g.name, hw)
        try:
            metrics, samples = _score_one(cfg, g, ref, bert)
        except (FileNotFoundError, ValueError) as e:
            stage.record(f"scores-{g.name}", point, status="failed", reason=str(e))
            continue
        stage.record(f"scores-{g.name}", point, metrics=metrics, samples=samples)
        made += 1
    return made


def _score_one(cfg: StudyConfig, g: rec.Record, ref: rec.Record | None,
               bert: BertScorer) -> tuple[dict[str, Any], dict[str, list[float]]]:
    rows = _outputs(cfg, g)
    answers = [r["answer"] for r in rows]
    references = [r["reference"] for r in rows]
    task = {**compare(answers, references, bert), "exact_match": exact_match(answers, references)}
    kinds = dict.fromkeys(r["task"] for r in rows)
    by_kind = {
        kind: mean_of({
            k: [v[i] for i, r in enumerate(rows) if r["task"] == kind] for k, v in task.items()
        })
        for kind in kinds
    }
    metrics: dict[str, Any] = {
        "meaningful": g.model.get("weights") == "real", "items": len(rows),
        "generated_tokens": g.metrics.get("generated_tokens"), "scorer": bert.info(),
        "task": mean_of(task), "task_by_kind": by_kind,
    }
    if not metrics["meaningful"]:
        metrics["note"] = NOT_MEANINGFUL
    kept = ("rougeL", "bertscore_f1", "exact_match")
    samples = {f"task_{k}": v for k, v in task.items() if k in kept}
    if ref is None:
        wanted = "-".join(map(str, reference_config(cfg, g.point)))
        metrics["drift_missing"] = f"no {wanted} outputs from the same sweep to compare with"
        return metrics, samples
    ref_rows = {r["item_id"]: r for r in _outputs(cfg, ref)}
    missing = [r["item_id"] for r in rows if r["item_id"] not in ref_rows]
    if missing:
        raise ValueError(f"the reference {ref.name} lacks items {missing[:5]}")
    pairs = [ref_rows[r["item_id"]] for r in rows]
    drift = {
        **compare(answers, [p["answer"] for p in pairs], bert),
        **token_fidelity([r["output_ids"] for r in rows], [p["output_ids"] for p in pairs]),
    }
    metrics.update(drift=mean_of(drift), reference=ref.name)
    kept = ("rougeL", "bertscore_f1", "first_diff")
    samples.update({f"drift_{k}": v for k, v in drift.items() if k in kept})
    return metrics, samples


def run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    e = cfg.evaluate
    items = dataset.load_items(e.dataset)  # fails before any model loads
    text = dataset.passage(cfg.evaluate)
    bert = BertScorer(e.bertscore) if e.score else None  # a bad scorer fails before generation
    payload, token_ids = tokenize(cfg, items, text)
    need_cuda = e.gpu.enabled and cfg.runtime in (None, "hf")
    problem = cuda_problem() if need_cuda else None
    if problem:
        log.warning("evaluate: %s; the CUDA configurations are recorded as skipped", problem)
    hw = stage.env["hardware"]["id"]
    digest = dataset.digest(items, text, e)
    points = generation_points(cfg, payload, token_ids, digest, hw, problem)
    tasks = dict.fromkeys(i.task for i in items)
    counts = ", ".join(f"{t} {sum(i.task == t for i in items)}" for t in tasks)
    log.info("evaluate: %d items (%s), %d scored tokens of held-out text, %d configurations",
             len(items), counts, len(token_ids) - 1, len(points))
    run_sweep(stage, points, resolve(e.dataset.path), {}, e.point_timeout_s, e.retry_failed,
              [stage_file], lambda m: None, measure=registry.run)
    if bert is not None:
        made = score(cfg, stage, bert)
        log.info("evaluate: %d configuration(s) scored", made)
    write_aggregates(cfg, STAGE)
