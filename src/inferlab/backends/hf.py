"""transformers (+ bitsandbytes) on CPU or CUDA: precision, batch, KV cache (none / dynamic / static), attention
implementation and torch.compile.

Each generation step is timed by a streamer that receives the step's tokens; on CUDA it synchronises the
device before reading the clock.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from inferlab.backends.base import Backend, BackendUnavailable
from inferlab.bench.timing import RequestTiming

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4", "nf4-dq")
BNB = {"int8", "nf4", "fp4", "nf4-dq"}
KV_CACHES = ("none", "dynamic", "static")
ATTENTION = ("sdpa", "eager")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class StepTimer:
    """A transformers streamer that timestamps every generation step (the first put() is the prompt)."""

    def __init__(self, sync):
        self.sync = sync
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFBackend(Backend):
    """settings: model_dir, precision, compute_dtype, device (cpu/cuda), attn, kv_cache, compile, compile_mode,
    threads."""

    name = "hf"

    def load(self) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self.settings
        device = s.get("device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA is not available on this machine")
        precision = s["precision"]
        if s.get("threads"):
            torch.set_num_threads(int(s["threads"]))
        kwargs: dict[str, Any] = {"attn_implementation": s.get("attn", "sdpa")}
        if precision in BNB:
            kwargs.update(self._bnb_kwargs(precision, s.get("compute_dtype", "bf16"), device))
        else:
            kwargs["dtype"] = getattr(torch, DTYPES[precision])
            if device == "cuda":
                kwargs["device_map"] = {"": 0}
        self.device = torch.device("cuda:0" if device == "cuda" else "cpu")
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(s["model_dir"], **kwargs).eval()
        self.sync()
        load_s = time.perf_counter() - t0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.model.generation_config.pad_token_id = pad
        # bytes of the weights as stored (packed 4-bit weights and their scales included)
        return {"load_s": load_s, "weight_bytes": int(self.model.get_memory_footprint())}

    @staticmethod
    def _bnb_kwargs(precision: str, compute_dtype: str, device: str) -> dict[str, Any]:
        import torch

        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise BackendUnavailable(f"bitsandbytes is not installed ({e}): pip install 'inferlab[gpu]'") from e
        if precision == "int8":
            q = BitsAndBytesConfig(load_in_8bit=True)
        else:
            q = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="fp4" if precision == "fp4" else "nf4",
                bnb_4bit_use_double_quant=precision == "nf4-dq",
                bnb_4bit_compute_dtype=getattr(torch, DTYPES[compute_dtype]),
            )
        return {"quantization_config": q, "device_map": {"": 0} if device == "cuda" else "cpu",
                "dtype": getattr(torch, DTYPES[compute_dtype])}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def generation_kwargs(self, new_tokens: int) -> dict[str, Any]:
        s = self.settings
        kv = s.get("kv_cache", "dynamic")
        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # fixed length: EOS cannot end it early
            do_sample=False, use_cache=kv != "none",
        )
        if kv == "static":
            kwargs["cache_implementation"] = "static"
            if s.get("compile"):
                from transformers import CompileConfig

                kwargs["compile_config"] = CompileConfig(mode=s.get("compile_mode", "reduce-overhead"),
                                                         fullgraph=False)
            else:
                kwargs["disable_compile"] = True
        elif s.get("compile"):
            raise BackendUnavailable("torch.compile applies to the static KV cache only (kv_cache=static)")
        return kwargs

    def request(self, prompts: list[list[int]], new_tokens: int, past_key_values=None, **_: Any) -> RequestTiming:
        import torch

        ids = torch.tensor(prompts, device=self.device)
        timer = StepTimer(self.sync)
        kwargs = self.generation_kwargs(new_tokens)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=timer, **kwargs)
        self.sync()
        end = time.perf_counter()
        generated = out.shape[1] - ids.shape[1]
        return RequestTiming(start, timer.times, end, ids.shape[1], generated, ids.shape[0],
                             output_ids=out[:, ids.shape[1]:].tolist())

    def complete(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """One left-padded batch; stops at EOS (the KV-cache setting of the point applies)."""
        import torch

        pad = self.model.generation_config.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = self.generation_kwargs(max_new_tokens)
        kwargs.pop("min_new_tokens")
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, **kwargs)
        outputs = []
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            outputs.append(row)
        return outputs

    def token_logprobs(self, ids: list[int]) -> list[float]:
        import torch

        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=x, use_cache=False).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
        return lp.cpu().tolist()

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def unload(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
