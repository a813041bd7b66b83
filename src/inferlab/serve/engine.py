"""Generation engines behind the server: one worker thread per engine, fed by a bounded queue.

The event loop never runs generation: a request is put on the engine's queue (full: QueueFull, the server
answers 429) and its tokens come back as events through the loop's call_soon_threadsafe. transformers decodes
the requests waiting together as one batch (each with its own sampling, stop strings and length); llama.cpp
serves them in turn. A cancelled request (client gone) stops at its next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferlab.backends.base import Backend

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue is full: try again later."""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # ("text", str) once per generated token (its text may be "": held back, or a token without text),
    # then ("done", dict) or ("error", str)
    emit: Callable[[str, Any], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class TextAssembler:
    """Turns generated token ids into text increments that are safe to send: whole UTF-8 characters only, and
    no text that could be the start of a stop string (held back until it is known not to be one)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:i], i
                return out
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        end -= hold
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.decode(self.ids).rstrip("\ufffd")
        out, self.sent = text[self.sent:], len(text)
        return out


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
            batch = self._gather(first)
            self.in_flight = len(batch)
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                self._serve([r for r in batch if not r.cancelled.is_set()])
            except Exception as e:  # one bad batch must not kill the server
                log.exception("generation failed")
                for r in batch:
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
    req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                      "tail": tail})


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
        self.description = {"runtime": "llama_cpp", "model_path": model_path, "n_threads": n_threads,
                            "n_ctx": self.context_window, "n_batch": n_batch, "flash_attn": flash_attn,
                            "kv_type": kv_type}

    def _serve(self, batch: list[GenRequest]) -> None:
        for req in batch:
            if req.cancelled.is_set():
                continue
            if req.seed is not None:
                self.llm.set_seed(req.seed)
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
        self.description = {"runtime": "hf", "model_dir": model_dir, "precision": precision, "device": device,
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

    def _pick(self, logits, req: GenRequest, gen):
        import torch

        if req.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p  # the smallest set reaching top_p
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
            g.manual_seed(r.seed if r.seed is not None else int(time.time_ns() % (2**31)))
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
                    tok = self._pick(logits[i], r, gens[i])
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
