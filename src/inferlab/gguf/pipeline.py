"""Stage `convert`: HF checkpoint → GGUF F16 (F32 on request) → the configured quantizations.

Every file must load in llama.cpp and generate; the most precise file's logits are compared with
transformers' on the same ids, and llama.cpp must tokenize sample texts as transformers does.
`metrics/gguf.json` says what each file really holds: size, measured bits per weight, tensor
types and the tensors that fell back to another type.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from inferlab import llama_children
from inferlab.config import GGUF_FILE_TYPES, StudyConfig, resolve
from inferlab.gguf.convert import convert, holds, quantize, tensor_stats
from inferlab.records import write_json
from inferlab.stage import StageRun, relpath

log = logging.getLogger(__name__)

CHECK_TEXT = (
    "The river carries sand and stones to the sea, and the baker shapes the loaf before it rises."
)
# what llama.cpp must split into the same ids as transformers: digits, code, whitespace, scripts
TOKENIZER_SAMPLES = (
    "def area(r):\n    return 3.14159 * r ** 2  # circle, 2024-05-17",
    "Numbers 1e-5, 42, 1,000,000 and 007!",
    "  two spaces\tthen a tab\n\n\nand lines",
    "ünïcödé, émoji 🙂, 中文 and Ελληνικά",
    "don't, won't, I'll, they're",
)


def _quiet_child(log_path: str) -> None:
    """In the child: llama.cpp's output (stdout and stderr) goes to a file, read back if the child dies."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def isolated(fn, *args):
    """fn(*args) in a fresh process that loads llama.cpp first and never torch.

    A CUDA build crashes beside either (inferlab.load_llama_cpp_first); llama.cpp's own crashes
    then fail this file with a reason instead of ending the stage."""
    with tempfile.NamedTemporaryFile(prefix="inferlab-llama-", suffix=".log", delete=False) as f:
        log_path = f.name
    try:
        spawn = mp.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=_quiet_child,
                                 initargs=(log_path,)) as pool:
            try:
                with llama_children():  # the process starts in submit()
                    future = pool.submit(fn, *args)
                return future.result()
            except BrokenProcessPool as e:
                tail = Path(log_path).read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"llama.cpp's process died in {fn.__name__} ({e}); its last output:\n{tail}"
                ) from e
    finally:
        Path(log_path).unlink(missing_ok=True)


def check_generates(path: Path, n_tokens: int) -> int:
    """Load the file in llama.cpp and generate n_tokens greedily; returns how many came out."""
    import llama_cpp

    # verbose: the log goes to isolated()'s file, and into the failure's reason on a crash
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=None, verbose=True, seed=0)
    try:
        prompt = llm.tokenize(CHECK_TEXT.encode(), add_bos=False, special=False)
        out = []
        # Llama.generate does not stop at EOS by itself: we take exactly n_tokens.
        for tok in llm.generate(prompt, temp=0.0, top_k=1):
            out.append(tok)
            if len(out) >= n_tokens:
                break
        return len(out)
    finally:
        llm.close()


def llama_logits(
    path: Path, text: str, samples: tuple[str, ...] = ()
) -> tuple[list[int], np.ndarray, list]:
    """llama.cpp's ids and logits for text, and its ids for the samples (specials parsed).

    An F32 KV cache: the default F16 one adds about 5e-4 of relative error, hiding the file's."""
    import llama_cpp

    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=True, seed=0,
                          type_k=f32, type_v=f32)
    try:
        lids = llm.tokenize(text.encode(), add_bos=False, special=False)
        sample_ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in samples]
        llm.eval(lids)
        return lids, np.array(llm.scores[: len(lids)], dtype=np.float64), sample_ids
    finally:
        llm.close()


def tokenizer_samples(tok) -> list[str]:
    """TOKENIZER_SAMPLES and, where the tokenizer has a chat template, a conversation rendered with it."""
    texts = list(TOKENIZER_SAMPLES)
    if getattr(tok, "chat_template", None):
        chat = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "12 + 30 = 42."}]
        texts.append(tok.apply_chat_template(chat, tokenize=False))
    return texts


def logits_error(path: Path, hf_dir: Path) -> dict:
    """Relative L2 error of llama.cpp's logits against transformers' fp32 on the same ids.

    And whether llama.cpp tokenizes the check text and the samples as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok(CHECK_TEXT)["input_ids"]
    samples = tokenizer_samples(tok)
    lids, ours, sample_ids = isolated(llama_logits, path, CHECK_TEXT, tuple(samples))
    differs = [t for t, got in zip(samples, sample_ids) if tok(t)["input_ids"] != got]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    del model
    same = ids == lids
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)) if same else float("nan")
    return {
        "same_tokenization": same and not differs, "tokenization_texts": 1 + len(samples),
        "tokenization_differs": differs[:3], "prompt_tokens": len(ids), "logits_rel_error": err,
    }


def run(cfg: StudyConfig, stage: StageRun) -> bool:
    """Convert and quantize; returns True when every file converted, loaded and generated."""
    c = cfg.convert
    hf_dir = cfg.model_dir() / "hf"
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{relpath(hf_dir)} has no model: run the download stage first")
    (cfg.model_dir() / "gguf").mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    all_ok = True
    # Quantize from the most precise file written: F32 if asked for, else F16.
    need_f16 = {"f16"} if c.quants and "f32" not in c.outtypes else set()
    base_types = sorted(set(c.outtypes) | need_f16, key=lambda t: t != "f32")
    todo = [(t, "convert") for t in base_types] + [(q, "quantize") for q in c.quants]
    log.info("convert %s: %d files to make (%s)", cfg.model.name, len(todo),
             ", ".join(t for t, _ in todo))
    t_start = time.perf_counter()
    for i, (ftype, how) in enumerate(todo, 1):
        path = cfg.gguf_path(ftype)
        # logits and tokenization: on the most precise file (the others share its converter)
        check_logits = c.check_logits and ftype == base_types[0]
        point = {
            "ftype": ftype, "source": base_types[0] if how == "quantize" else "hf",
            "threads": c.threads, "check_tokens": c.check_tokens, "check_logits": check_logits,
        }
        metrics: dict = {}
        try:
            fallbacks = None
            if how == "convert":
                info = convert(hf_dir, path, ftype)
                metrics["convert_s"] = info["seconds"]
            else:
                done = isolated(quantize, cfg.gguf_path(base_types[0]), path,
                                GGUF_FILE_TYPES[ftype], c.threads)
                metrics["quantize_s"], fallbacks = round(done["seconds"], 3), done["fallbacks"]
            stats = tensor_stats(path)
            counts = ("tensor_types", "matrices")
            metrics.update({k: v for k, v in stats.items() if k not in counts})
            metrics.update(holds(ftype, stats, fallbacks))
            metrics["generated_tokens"] = isolated(check_generates, path, c.check_tokens)
            if metrics["generated_tokens"] != c.check_tokens:
                raise RuntimeError(f"generated {metrics['generated_tokens']} of {c.check_tokens} tokens")
            if check_logits:
                check = logits_error(path, hf_dir)
                metrics.update(check)
                if not check["same_tokenization"]:
                    raise RuntimeError("llama.cpp tokenizes text differently from transformers: "
                                       f"{(check['tokenization_differs'] or [CHECK_TEXT])[0]!r}")
                if ftype == "f32" and not check["logits_rel_error"] < c.max_logits_rel_error:
                    raise RuntimeError(
                        f"F32 logits differ from transformers by {check['logits_rel_error']:.2e} "
                        f"(allowed {c.max_logits_rel_error:.0e})"
                    )
            stage.record(ftype, point, metrics=metrics, artifacts={"gguf": relpath(path)})
            shown = ("label", "file_bytes", "bits_per_weight", "tensor_types", "matrices",
                     "fallback_tensors")
            summary[ftype] = {"status": "ok", **{k: metrics[k] for k in shown}}
            for key in ("fallback_to", "fallbacks", "logits_rel_error", "same_tokenization"):
                if key in metrics:
                    summary[ftype][key] = metrics[key]
        except Exception as e:  # one bad type must not stop the others; recorded with its reason
            all_ok = False
            path.unlink(missing_ok=True)
            stage.record(ftype, point, status="failed", reason=f"{type(e).__name__}: {e}",
                         metrics=metrics)
            summary[ftype] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(todo) - i)
        log.info("[%d/%d] %s %s: %s (%.1f s so far, about %.0f s left)", i, len(todo), how, ftype,
                 summary[ftype].get("label", summary[ftype]["status"]), elapsed, eta)
    write_json(resolve(cfg.paths.metrics) / "gguf.json", {
        "model": cfg.model.name, "weights": cfg.model.weights, "types": summary,
    })
    return all_ok
