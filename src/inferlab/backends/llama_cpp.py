"""llama.cpp through llama-cpp-python: GGUF files, threads, batch, flash attention, KV type, cache.

The clock is read as the consumer sees each token; llama.cpp's own counters (llama_perf_context)
say how much of that time llama.cpp spent: the rest is harness and Python overhead.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from inferlab.backends.base import Backend, BackendUnavailable, log_softmax
from inferlab.backends.timing import RequestTiming

log = logging.getLogger(__name__)

# ggml_type ids for the KV cache (type_k / type_v)
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}
APIS = ("generate", "completion", "completion_stream")
PROMPT_CACHES = ("none", "ram", "disk")


def exact_length(n_prompt: int, new_tokens: int):
    """A stopping criterion that ends a completion after exactly new_tokens tokens.

    llama-cpp-python skips its max_tokens check while the text ends inside a multi-byte UTF-8
    character, so a completion could otherwise run past max_tokens."""
    import llama_cpp

    # called before each sampled token is yielded, with the ids so far (prompt + yielded)
    return llama_cpp.StoppingCriteriaList(
        [lambda ids, _logits: len(ids) - n_prompt >= new_tokens]
    )


class LlamaCppBackend(Backend):
    """settings: model_path, n_threads, n_batch, flash_attn, kv_type, n_ctx, n_gpu_layers.

    Also cache_dir, and the prefix-cache scenario's mode (none / context / ram / disk)."""

    name = "llama_cpp"

    def load(self) -> dict[str, Any]:
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - the project installs it
            raise BackendUnavailable(f"llama-cpp-python is not installed: {e}") from e
        s = self.settings
        path = Path(s["model_path"])
        if not path.exists():
            raise BackendUnavailable(
                f"{path} does not exist: run the convert stage for this quant type"
            )
        if s.get("n_gpu_layers", 0) != 0 and not llama_cpp.llama_supports_gpu_offload():
            raise BackendUnavailable(
                "this llama-cpp-python was built without GPU offload: rebuild it with CUDA "
                "(CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python)")
        kv = KV_TYPES[s.get("kv_type", "f16")]
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=s.get("n_ctx", 2048), n_batch=s.get("n_batch", 512),
            n_ubatch=s.get("n_batch", 512), n_threads=s["n_threads"],
            n_threads_batch=s["n_threads"],
            flash_attn=bool(s.get("flash_attn", False)), type_k=kv, type_v=kv,
            n_gpu_layers=s.get("n_gpu_layers", 0), seed=0, verbose=False,
            logits_all=bool(s.get("logits_all", False)),  # every position's logits: perplexity
        )
        load_s = time.perf_counter() - t0
        self.eos = self.llm.token_eos()
        cache = s.get("mode", "none") if s.get("scenario") == "prefix_cache" else "none"
        if cache == "ram":
            self.llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=4 << 30))
        elif cache == "disk":
            folder = s.get("cache_dir") or tempfile.mkdtemp(prefix="inferlab-prompt-cache-")
            self._cache_dir = folder
            self.llm.set_cache(llama_cpp.LlamaDiskCache(cache_dir=self._cache_dir))
        from inferlab.gguf.convert import tensor_stats

        stats = tensor_stats(path)  # what the file holds (types may differ from its name's)
        return {
            "load_s": load_s, "weight_bytes": stats["weight_bytes"],
            "file_bytes": path.stat().st_size, "bits_per_weight": stats["bits_per_weight"],
            "tensor_types": stats["tensor_types"],
            "llama_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        }

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """special: parse special-token texts (a chat template's <|im_start|>) as those tokens."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=special)

    def _perf(self) -> dict[str, float]:
        import llama_cpp

        p = llama_cpp.llama_perf_context(self.llm.ctx)
        return {"prompt_ms": p.t_p_eval_ms, "eval_ms": p.t_eval_ms, "n_prompt_eval": p.n_p_eval,
                "n_eval": p.n_eval}

    def request(self, prompts: list[list[int]], new_tokens: int, api: str = "generate",
                reset: bool = True, **_: Any) -> RequestTiming:
        """One sequence at a time; reset=False keeps the previous request's KV cache (a prefix).

        The prompt cache (ram/disk) works only through the completion API, as in a server."""
        import llama_cpp

        if len(prompts) != 1:
            raise BackendUnavailable("llama-cpp-python runs one sequence per request (batch 1)")
        prompt = prompts[0]
        if reset:
            self.llm.reset()
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        times: list[float] = []
        start = time.perf_counter()
        if api == "generate":
            # generate() does not stop at EOS by itself: exactly new_tokens come out.
            for _tok in self.llm.generate(prompt, temp=0.0, top_k=1, reset=reset):
                times.append(time.perf_counter())
                if len(times) >= new_tokens:
                    break
            generated = len(times)
        elif api in ("completion", "completion_stream"):
            # The completion API stops at EOS, which random weights emit at any step: banned.
            # exact_length holds the length to exactly new_tokens.
            kwargs = dict(max_tokens=new_tokens, temperature=0.0, top_k=1,
                          logit_bias={self.eos: -math.inf},
                          stopping_criteria=exact_length(len(prompt), new_tokens))
            if api == "completion_stream":
                # one chunk per token (its text may be empty: part of a multi-byte character),
                # then a last chunk that only carries the finish reason
                for chunk in self.llm.create_completion(prompt, stream=True, **kwargs):
                    if chunk["choices"][0]["finish_reason"] is None:
                        times.append(time.perf_counter())
                generated = len(times)
            else:
                out = self.llm.create_completion(prompt, **kwargs)
                generated = out["usage"]["completion_tokens"]
        else:
            raise ValueError(f"api {api!r}; allowed: {', '.join(APIS)}")
        end = time.perf_counter()
        perf = self._perf()
        return RequestTiming(start, times, end, len(prompt), generated, 1, perf)

    def complete(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """One sequence at a time, greedy, from an empty context; stops at EOS."""
        outputs = []
        for prompt in prompts:
            self.llm.reset()
            out: list[int] = []
            for tok in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if tok == self.eos:
                    break
                out.append(tok)
                if len(out) >= max_new_tokens:
                    break
            outputs.append(out)
        return outputs

    def logprobs(self, ids: list[int]):
        if not self.settings.get("logits_all"):
            raise RuntimeError("logprobs needs the model loaded with logits_all=True")
        self.llm.reset()
        self.llm.eval(ids)
        return log_softmax(self.llm.scores[:len(ids)])

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def stream(self, prompt: list[int], new_tokens: int, **opts: Any):
        chunks = self.llm.create_completion(prompt, stream=True, max_tokens=new_tokens, **opts)
        for chunk in chunks:
            yield chunk["choices"][0]["text"]

    def unload(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
        if getattr(self, "_cache_dir", None) and not self.settings.get("cache_dir"):
            shutil.rmtree(self._cache_dir, ignore_errors=True)
