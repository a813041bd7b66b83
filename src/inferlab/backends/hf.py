"""transformers (+ bitsandbytes, torchao) on CPU or CUDA: precision, batch, KV cache (none /
dynamic / static), attention implementation, torch.compile, and the fast and graph decode loops.

Loading and the quantization recipes are in hf_load.py, the timed decode paths in hf_decode.py;
this is the backend interface over them. Each generation step is timed as its tokens become
available; on CUDA the device is synchronised (or its events read) before the clock is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from inferlab.backends import hf_load
from inferlab.backends.base import Backend, BackendUnavailable
from inferlab.backends.hf_decode import StaticDecoder, StepTimer, generate_request, step_kernels_run
from inferlab.backends.hf_load import stored_bytes
from inferlab.backends.timing import RequestTiming
from inferlab.config import DECODE_LOOPS, loop_path

log = logging.getLogger(__name__)

__all__ = ["HFBackend", "StepTimer", "stored_bytes"]


class HFBackend(Backend):
    """settings: model_dir, precision, compute_dtype, device (cpu/cuda), attn, kv_cache, compile,
    compile_mode, threads, decode (generate / fast / graph / kernels), inductor, fuse_qkv /
    fuse_block, gemv."""

    name = "hf"

    def __init__(self, settings: dict[str, Any]):
        super().__init__(settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: Any = None  # torch.device, once loaded
        self.sync: Callable[[], None] = lambda: None
        self.decoder: StaticDecoder | None = None  # the fast and graph loops, once loaded
        # called once a loop's prefill is queued (profiler)
        self.after_prefill: Callable[[], None] | None = None

    def load(self) -> dict[str, Any]:
        loaded = hf_load.load(self.settings)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.sync = loaded.device, loaded.sync
        self.decoder = StaticDecoder(self.model, self.device, self.sync, self.settings,
                                     self._prefilled)
        if self.settings.get("decode") == "kernels":  # which implementation of its kernels ran
            loaded.figures["step_kernels"] = step_kernels_run(self.device)
        return loaded.figures

    def _prefilled(self) -> None:
        if self.after_prefill is not None:
            self.after_prefill()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def generation_kwargs(self, new_tokens: int) -> dict[str, Any]:
        s = self.settings
        kv = s.get("kv_cache", "dynamic")
        kwargs: dict[str, Any] = dict(
            # fixed length: EOS cannot end it early
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=kv != "none",
        )
        if kv == "static":
            kwargs["cache_implementation"] = "static"
            if s.get("compile"):
                from transformers import CompileConfig

                mode = s.get("compile_mode", "reduce-overhead")
                kwargs["compile_config"] = CompileConfig(mode=mode, fullgraph=False)
            else:
                kwargs["disable_compile"] = True
        elif s.get("compile"):
            raise BackendUnavailable(
                "torch.compile applies to the static KV cache only (kv_cache=static)"
            )
        return kwargs

    def request(self, prompts: list[list[int]], new_tokens: int, past_key_values=None,
                **_: Any) -> RequestTiming:
        decode = self.settings.get("decode")
        if decode in DECODE_LOOPS:
            if past_key_values is not None:
                raise BackendUnavailable(
                    f"the {decode} decode loop does not take a precomputed prefix cache"
                )
            assert self.decoder is not None, "load() first"
            loop = self.decoder.fast_request if decode == "fast" else self.decoder.graph_request
            return loop(prompts, new_tokens)
        kwargs = self.generation_kwargs(new_tokens)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return generate_request(self.model, self.device, self.sync, prompts, kwargs)

    def complete(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """One left-padded batch; stops at EOS (the KV-cache setting of the point applies)."""
        import torch

        pad = self.model.generation_config.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        kwargs = self.generation_kwargs(max_new_tokens)
        kwargs.pop("min_new_tokens")
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos,
                                      **kwargs)
        outputs = []
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            outputs.append(row)
        return outputs

    def scored_by(self) -> str:
        loop = loop_path(self.settings)
        if loop is None:
            return super().scored_by()
        return f"the {loop} step, fed one position at a time (teacher forcing, no prefill)"

    def logprobs(self, ids: list[int]):
        import torch

        if loop_path(self.settings) is not None:  # through the step the loop was timed with
            assert self.decoder is not None, "load() first"
            return self.decoder.forced_logprobs(ids, int(self.settings.get("batch_size") or 1))
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=x, use_cache=False).logits[0].float()
            return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def unload(self) -> None:
        import gc

        import torch

        self.model = self.decoder = None  # its cache and compiled steps go with the model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
