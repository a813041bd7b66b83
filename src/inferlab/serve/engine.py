"""Generation engines behind the server: one worker thread per engine, fed by a bounded queue.

The event loop never runs generation: a request is put on the engine's queue (full: QueueFull, the server
answers 429) and its tokens come back as events through the loop's call_soon_threadsafe. transformers decodes
the requests waiting together as one batch (each with its own sampling, stop strings and length); llama.cpp
serves them in turn. A cancelled request (client gone) stops at its next token.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferlab.backends.base import Backend
from inferlab.serve.text import StopMatcher, TextAssembler

__all__ = ["Engine", "GenRequest", "HFEngine", "LlamaCppEngine", "QueueFull", "TextAssembler"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue is full: try again later."""


# Seeds the engines honour: llama.cpp's sampler takes 32 bits and reads 0xFFFFFFFF as "pick one at random".
MAX_SEED = 2**32 - 2
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by 5e-324 gives inf and NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # below MIN_TEMPERATURE: greedy
    top_p: float = 1.0
    stop: list[str] | StopMatcher = field(default_factory=list)  # a matcher: built off the engine's thread
    seed: int | None = None  # 0..MAX_SEED; None: a fresh random seed for this request alone
    # ("text", str) once per generated token (its text may be "": held back, or a token without text),
    # then ("done", dict) or ("error", str)
    emit: Callable[[str, Any], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    finished: bool = False  # its last event ("done" or "error") was sent

    def settle_sampling(self) -> None:
        """Before generation: a fresh seed when none was given (never the previous request's state), and a
        temperature below the floor made greedy."""
        if self.seed is None:
            self.seed = secrets.randbelow(MAX_SEED + 1)
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0


class Engine:
    """Base: the queue, the worker thread, the bookkeeping. Subclasses load a model and implement _serve."""

    runtime = ""

    def __init__(self, max_queue: int):
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.in_flight = 0
        self.batch_sizes: dict[int, int] = {}  # how many batches of each size the engine ran
        self.context_window = 0
        self.description: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the model (the backend's own tokenizer) --
    backend: Backend

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return self.backend.detokenize(ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[str, list[str]]:
        """The prompt for a chat and the stop strings its format implies."""
        template = getattr(self, "chat_template", None)
        if template is not None:
            return template(messages), []
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:", ["\nUser:", "\nSystem:"]

    # -- the queue --
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"{self.runtime}-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, req: GenRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull from None

    def _take(self, block_s: float) -> GenRequest | None:
        try:
            return self.queue.get(timeout=block_s)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._take(0.1)
            if first is None:
                continue
            batch = [r for r in self._gather(first) if not r.cancelled.is_set()]
            for r in batch:
                r.settle_sampling()
            if not batch:
                continue
            self.in_flight = len(batch)
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                self._serve(batch)
            except Exception as e:  # one bad batch must not kill the server
                log.exception("generation failed")
                for r in batch:
                    if not r.finished:
                        r.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self.in_flight = 0

    def _gather(self, first: GenRequest) -> list[GenRequest]:
        return [first]

    def _serve(self, batch: list[GenRequest]) -> None:
        raise NotImplementedError


def _finish(req: GenRequest, asm: TextAssembler, n: int, reason: str) -> None:
    # text held back to the end (a possible stop-string start that was not one) rides on the final event
    tail = asm.flush() if reason != "stop" else ""
    req.finished = True
    req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                      "tail": tail})


def _fail(req: GenRequest, e: Exception) -> None:
    log.warning("generation failed for one request: %s: %s", type(e).__name__, e)
    req.finished = True
    req.emit("error", f"{type(e).__name__}: {e}")


class LlamaCppEngine(Engine):
    """llama.cpp: one request at a time, in arrival order."""

    runtime = "llama_cpp"

    def __init__(self, model_path: str, n_threads: int, n_ctx: int, max_queue: int, n_batch: int = 512,
                 flash_attn: bool = False, kv_type: str = "f16"):
        super().__init__(max_queue)
        from inferlab.backends.llama_cpp import LlamaCppBackend

        self.backend = LlamaCppBackend({"model_path": model_path, "n_threads": n_threads, "n_ctx": n_ctx,
                                        "n_batch": n_batch, "flash_attn": flash_attn, "kv_type": kv_type})
        self.backend.load()
        self.llm = self.backend.llm
        self.eos = self.llm.token_eos()
        self.context_window = self.llm.n_ctx()
        self.description = {"runtime": "llama_cpp", "model_file": Path(model_path).name, "n_threads": n_threads,
                            "n_ctx": self.context_window, "n_batch": n_batch, "flash_attn": flash_attn,
                            "kv_type": kv_type}

    def _serve(self, batch: list[GenRequest]) -> None:
        for req in batch:
            if req.cancelled.is_set():
                continue
            self.llm.set_seed(req.seed)  # every request sets its own: a seed never carries over to the next
            asm, n, reason = TextAssembler(self.decode, req.stop), 0, "length"
            gen = self.llm.generate(req.prompt_ids, temp=req.temperature, top_p=req.top_p, top_k=0, min_p=0.0,
                                    repeat_penalty=1.0, reset=True)
            try:
                for tok in gen:
                    if req.cancelled.is_set():
                        reason = "cancelled"
                        break
                    if tok == self.eos:
                        reason = "stop"
                        break
                    n += 1
                    req.emit("text", asm.add(tok))  # one event per token, even when its text is held back
                    if asm.stopped:
                        reason = "stop"
                        break
                    if n >= req.max_tokens:
                        break
            finally:
                gen.close()
            _finish(req, asm, n, reason)


class HFEngine(Engine):
    """transformers: requests that wait together are decoded as one left-padded batch, each sequence with its own
    sampling, stop strings and length; a finished or cancelled sequence stops emitting at once and the batch ends
    when all have."""

    runtime = "hf"

    def __init__(self, model_dir: str, precision: str, device: str, max_queue: int, max_batch: int,
                 batch_wait_ms: float, n_threads: int = 0):
        super().__init__(max_queue)
        import torch

        from inferlab.backends.hf import HFBackend

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = HFBackend({"model_dir": model_dir, "precision": precision, "device": device,
                                  "attn": "sdpa", "kv_cache": "dynamic", "threads": n_threads,
                                  "compute_dtype": "fp16" if device == "cuda" else "bf16"})
        self.backend.load()
        self.model, self.tok = self.backend.model, self.backend.tokenizer
        self.device = self.backend.device
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.context_window = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        if getattr(self.tok, "chat_template", None):
            self.chat_template = lambda msgs: self.tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                           tokenize=False)
        self.description = {"runtime": "hf", "precision": precision, "device": device,
                            "max_batch": max_batch, "context_window": self.context_window}

    def _gather(self, first: GenRequest) -> list[GenRequest]:
        batch, deadline = [first], time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            nxt = self._take(left) if left > 0 else None
            if nxt is None:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
            batch.append(nxt)
        return batch

    @staticmethod
    def _pick(logits, req: GenRequest, gen) -> int:
        """One token: greedy at temperature 0 (the engine floors tiny temperatures to 0), else nucleus sampling.
        The most likely token is always kept, so no top_p, however small, leaves nothing to sample from."""
        import torch

        if req.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p  # the smallest set reaching top_p
            keep[0] = True
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
            return int(idx[choice])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _serve(self, batch: list[GenRequest]) -> None:
        import torch

        if not batch:
            return
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        gens = []
        for r in batch:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.seed)  # its own generator: one request's seed never touches another's sample
            gens.append(g)
        asms = [TextAssembler(self.decode, r.stop) for r in batch]
        counts = [0] * len(batch)
        active = [True] * len(batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        past, cur = None, ids
        with torch.inference_mode():
            while any(active):
                out = self.model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float().cpu()
                nxt = []
                for i, r in enumerate(batch):
                    if not active[i]:
                        nxt.append(self.pad)
                        continue
                    if r.cancelled.is_set():
                        active[i] = False
                        _finish(r, asms[i], counts[i], "cancelled")
                        nxt.append(self.pad)
                        continue
                    try:
                        tok = self._pick(logits[i], r, gens[i])
                    except Exception as e:  # this request fails alone; the others in the batch go on
                        active[i] = False
                        _fail(r, e)
                        nxt.append(self.pad)
                        continue
                    nxt.append(tok)
                    if tok == self.eos:
                        active[i] = False
                        _finish(r, asms[i], counts[i], "stop")
                        continue
                    counts[i] += 1
                    r.emit("text", asms[i].add(tok))  # one event per token
                    if asms[i].stopped or counts[i] >= r.max_tokens:
                        active[i] = False
                        _finish(r, asms[i], counts[i], "stop" if asms[i].stopped else "length")
                if not any(active):
                    break
                cur = torch.tensor(nxt, device=self.device).unsqueeze(-1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                pos = pos[:, -1:] + 1
