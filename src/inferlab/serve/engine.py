"""Generation engines behind the server: one worker thread per engine, fed by a bounded queue.

The event loop never runs generation: a request is put on the engine's queue (full: QueueFull,
the server answers 429) and its tokens come back as events through the loop's
call_soon_threadsafe. transformers (hf_engine.py) decodes the requests waiting together as one
batch (each with its own sampling, stop strings and length); llama.cpp serves them in turn. A
cancelled request (client gone) stops at its next token.
"""

from __future__ import annotations

import collections
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

__all__ = ["ChatPrompt", "Engine", "GenRequest", "LlamaCppEngine", "QueueFull", "TextAssembler"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue is full: try again later."""


# Seeds the engines honour: llama.cpp's sampler takes 32 bits and reads 0xFFFFFFFF as "pick one
# at random".
MAX_SEED = 2**32 - 2
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by 5e-324
# gives inf and NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # below MIN_TEMPERATURE: greedy
    top_p: float = 1.0
    # a matcher: built off the engine's thread
    stop: list[str] | StopMatcher = field(default_factory=list)
    seed: int | None = None  # 0..MAX_SEED; None: a fresh random seed for this request alone
    # go on past the end-of-sequence token: exactly max_tokens (vLLM's ignore_eos)
    ignore_eos: bool = False
    # ("text", str) once per generated token (its text may be "": held back, or a token without
    # text), then ("done", dict) or ("error", str)
    emit: Callable[[str, Any], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    finished: bool = False  # its last event ("done" or "error") was sent
    began: float = 0.0  # when the engine took it up
    produced: int = 0  # tokens generated so far
    first_token: float = 0.0
    last_token: float = 0.0

    def settle_sampling(self) -> None:
        """Before generation: a fresh seed when none was given (never the previous request's
        state), and a temperature below the floor made greedy."""
        if self.seed is None:
            self.seed = secrets.randbelow(MAX_SEED + 1)
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0


@dataclass
class ChatPrompt:
    text: str
    stop: list[str]  # the stop strings the format implies


class Engine:
    """The queue, the worker thread, the bookkeeping (a subclass loads a model, has _serve)."""

    runtime = ""

    def __init__(self, max_queue: int):
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.in_flight = 0
        self.batch_sizes: dict[int, int] = {}  # how many batches of each size the engine ran
        self.context_window = 0
        self.description: dict[str, Any] = {}
        self.lanes = 1  # requests generated at once
        # measured pace (moving averages): from taking a request up to its first token, and
        # between two tokens
        self.prefill_s: float | None = None
        self.step_s: float | None = None
        # the same of the last requests one by one: Retry-After plans with the slowest (coming
        # back late costs a little wait, coming back early costs a retry)
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=16)
        self._active: list[GenRequest] = []
        self.held: list[GenRequest] = []  # taken from the queue, left for the next batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the model (the backend's own tokenizer) --
    backend: Backend

    def tokenize(self, text: str) -> list[int]:
        """A special token's text (a chat template's <|im_start|>) is that token, in a chat and in a
        completion alike, as transformers' tokenizer, vLLM and llama.cpp's server read it."""
        return self.backend.tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return self.backend.detokenize(ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> ChatPrompt:
        """The prompt for a chat: the model's own chat template, else plain role lines."""
        template = getattr(self, "chat_template", None)
        if template is not None:
            return ChatPrompt(template(messages), [])
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return ChatPrompt("\n".join(lines) + "\nAssistant:", ["\nUser:", "\nSystem:"])

    # -- the queue --
    def start(self) -> None:
        # here, before the server is built around it: its imports would slow these tokens down
        self._warm_up()
        self._thread = threading.Thread(target=self._loop, name=f"{self.runtime}-engine",
                                        daemon=True)
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
        if self.held:
            return self.held.pop(0)
        try:
            return self.queue.get(timeout=block_s)
        except queue.Empty:
            return None

    def _warm_up(self) -> None:
        """Two short generations before the first request, the second one timed: the pace
        Retry-After is computed from is known from the start (the first run of a model is
        slower: buffers, caches)."""
        ids = self.tokenize("Hello") or [self.eos]
        for _ in range(2):
            self.prefill_s = self.step_s = None
            self.recent.clear()
            req = GenRequest(prompt_ids=ids, max_tokens=16, temperature=0.0, seed=0,
                             ignore_eos=True)
            try:
                self._serve([self._started(req)])
                self._paced([req])
            except Exception as e:  # noqa: BLE001 - the first real request will say what is wrong
                log.warning("warm-up generation failed: %s: %s", type(e).__name__, e)
                break
            finally:
                self._active = []

    def _started(self, req: GenRequest) -> GenRequest:
        req.began = time.perf_counter()
        self._active.append(req)
        return req

    def _tick(self, req: GenRequest) -> None:
        """One token of req was generated."""
        now = time.perf_counter()
        if req.produced == 0:
            req.first_token = now
        req.produced += 1
        req.last_token = now

    def _paced(self, reqs: list[GenRequest]) -> None:
        """Requests were served: the measured pace follows them, each request's whole time (a
        busy machine stalls some tokens for long: the mean of a whole request holds those
        stalls, recent gaps miss them)."""
        for r in reqs:
            if r.produced:
                self.prefill_s = _average(self.prefill_s, r.first_token - r.began)
            if r.produced > 1:
                step = (r.last_token - r.first_token) / (r.produced - 1)
                self.step_s = _average(self.step_s, step)
                self.recent.append((r.first_token - r.began, step))

    def finish_times(self) -> list[float]:
        """Seconds from now until each request in flight, then each waiting, is done, at the
        slowest recent pace and if each runs to its max_tokens (empty: nothing measured yet)."""
        if self.step_s is None or self.prefill_s is None:
            return []
        prefill_s = max([self.prefill_s] + [p for p, _ in self.recent])
        step_s = max([self.step_s] + [s for _, s in self.recent])
        with self.queue.mutex:
            waiting = list(self.queue.queue)
        out, t = [], 0.0
        for r in [r for r in self._active if not r.finished] + self.held + waiting:
            prefill = 0.0 if r.produced else prefill_s
            t += (prefill + step_s * max(r.max_tokens - r.produced, 0)) / self.lanes
            out.append(t)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._take(0.1)
            if first is None:
                continue
            batch = [r for r in self._gather(first) if not r.cancelled.is_set()]
            for r in batch:
                r.settle_sampling()
                self._started(r)
            if not batch:
                continue
            self.in_flight = len(batch)
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            try:
                self._serve(batch)
                self._paced(batch)
            except Exception as e:  # one bad batch must not kill the server
                log.exception("generation failed")
                for r in batch:
                    if not r.finished:
                        r.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self.in_flight = 0
                self._active = []

    def _gather(self, first: GenRequest) -> list[GenRequest]:
        return [first]

    def _serve(self, batch: list[GenRequest]) -> None:
        raise NotImplementedError


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


def _finish(req: GenRequest, asm: TextAssembler, n: int, reason: str) -> None:
    # text held back to the end (a possible stop-string start that was not one) rides on the
    # final event; after a matched stop string the assembler has nothing left to give
    tail = asm.flush()
    req.finished = True
    req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                      "completion_tokens": n, "tail": tail})


def _fail(req: GenRequest, e: Exception) -> None:
    log.warning("generation failed for one request: %s: %s", type(e).__name__, e)
    req.finished = True
    req.emit("error", f"{type(e).__name__}: {e}")


def gguf_chat_template(llm, template: str) -> Callable[[list[dict[str, str]]], str]:
    """The GGUF's tokenizer.chat_template, rendered as transformers renders it.

    Through llama-cpp-python's Jinja2ChatFormatter, with the model's own BOS and EOS texts, ending
    in the assistant's turn (add_generation_prompt)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llm._model.token_get_text(token) if token >= 0 else ""

    fmt = Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()),
                              bos_token=text(llm.token_bos()), add_generation_prompt=True)
    return lambda messages: fmt(messages=messages).prompt


class LlamaCppEngine(Engine):
    """llama.cpp: one request at a time, in arrival order."""

    runtime = "llama_cpp"

    def __init__(self, model_path: str, n_threads: int, n_ctx: int, max_queue: int,
                 n_batch: int = 512, flash_attn: bool = False, kv_type: str = "f16",
                 n_gpu_layers: int = 0):
        super().__init__(max_queue)
        from inferlab.backends.llama_cpp import LlamaCppBackend

        self.backend = LlamaCppBackend({"model_path": model_path, "n_threads": n_threads,
                                        "n_ctx": n_ctx, "n_batch": n_batch,
                                        "flash_attn": flash_attn, "kv_type": kv_type,
                                        "n_gpu_layers": n_gpu_layers})
        self.backend.load()
        self.llm = self.backend.llm
        self.eos = self.llm.token_eos()
        self.context_window = self.llm.n_ctx()
        template = self.llm.metadata.get("tokenizer.chat_template")
        # the model's own chat format, rendered as llama-cpp-python's chat handler renders it
        if template:
            self.chat_template = gguf_chat_template(self.llm, template)
        self.description = {"runtime": "llama_cpp", "model_file": Path(model_path).name,
                            "n_threads": n_threads, "n_ctx": self.context_window,
                            "n_batch": n_batch, "flash_attn": flash_attn, "kv_type": kv_type,
                            "n_gpu_layers": n_gpu_layers}

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text, special=True)

    def _serve(self, batch: list[GenRequest]) -> None:
        for req in batch:
            if req.cancelled.is_set():
                continue
            # every request sets its own: a seed never carries over to the next
            self.llm.set_seed(req.seed)
            asm, n, reason = TextAssembler(self.decode, req.stop), 0, "length"
            # an empty context: generate() would keep the longest common prefix of the last
            # request and evaluate only the rest, in batches of other sizes, so the same request
            # gave other tokens after another one
            self.llm.reset()
            gen = self.llm.generate(req.prompt_ids, temp=req.temperature, top_p=req.top_p,
                                    top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True)
            try:
                for tok in gen:
                    if req.cancelled.is_set():
                        reason = "cancelled"
                        break
                    if tok == self.eos and not req.ignore_eos:
                        reason = "stop"
                        break
                    n += 1
                    self._tick(req)
                    # one event per token, even when its text is held back
                    req.emit("text", asm.add(tok))
                    if asm.stopped:
                        reason = "stop"
                        break
                    if n >= req.max_tokens:
                        break
            finally:
                gen.close()
            _finish(req, asm, n, reason)
