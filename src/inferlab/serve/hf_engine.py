"""The transformers engine: the requests that wait together are decoded as one left-padded batch,
each with its own sampling, stop strings and length.

Two ways to step a batch, as the benchmark measured them:
- DynamicSteps: generate()'s dynamic cache, grown by every step (the default);
- StaticSteps: the recommendation's static cache and decode loop. The cache has a fixed number of
  rows (the batch size, unused rows padded) and positions (the served context); each step is one
  forward of fixed shape, compiled when the configuration is, and on CUDA captured once as a
  graph and replayed (the graph loop). Rows keep their own positions and padding mask, so
  prompts of any length share a batch.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

from inferlab.serve.engine import Engine, GenRequest, _fail, _finish
from inferlab.serve.text import TextAssembler

__all__ = ["DynamicSteps", "HFEngine", "StaticSteps", "served_loop"]

log = logging.getLogger(__name__)

# a benchmark point's settings the engine honours beside precision and batch size: how the
# model is loaded, and how a batch is stepped
LOAD_KEYS = ("attn", "gemv", "fuse_qkv", "fuse_block", "inductor")
LOOP_KEYS = ("kv_cache", "compile", "compile_mode", "decode")


def served_loop(settings: dict[str, Any]) -> tuple[str, str]:
    """(how the engine steps a batch, why when it differs from what the settings name)."""
    decode = settings.get("decode") or "generate"
    static = settings.get("kv_cache") == "static"
    if decode == "kernels":
        return "graph", ("decode: kernels is a benchmark step (batch 1, greedy, no padding mask): "
                         "served as the graph loop over the model's own forward")
    if decode in ("graph", "fast"):
        return "graph", "" if decode == "graph" else "the fast loop served as the graph loop"
    return ("static" if static else "dynamic"), ""


class DynamicSteps:
    """generate()'s way: a dynamic cache that grows by a column every step."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.past = self.mask = self.pos = None

    def start(self, ids, mask):
        """The prefill of a left-padded batch (n, w): next-token logits (n, vocabulary)."""
        self.mask, self.pos = mask, (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids)

    def next(self, tokens: list[int]):
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        self.pos = self.pos[:, -1:] + 1
        return self._forward(torch.tensor(tokens, device=self.device).unsqueeze(-1))

    def _forward(self, ids):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :]


class StaticSteps:
    """A static cache of `lanes` rows and `length` positions; every decode step has one shape,
    compiled when `compile`, and on CUDA captured as a graph when `graph` (else run as is)."""

    def __init__(self, model, device, lanes: int, length: int, pad: int, compile: bool,
                 compile_mode: str, graph: bool):
        import torch
        from transformers import StaticCache

        self.model, self.device, self.lanes, self.length, self.pad = (model, device, lanes, length,
                                                                       pad)
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.tok = torch.full((lanes, 1), pad, dtype=torch.long, device=device)
        self.pos = torch.zeros((lanes, 1), dtype=torch.long, device=device)
        self.at = torch.zeros((1,), dtype=torch.long, device=device)  # the cache position
        self.mask = torch.zeros((lanes, length), dtype=torch.long, device=device)
        self.logits = None  # the step's output (lanes, vocabulary), made by the first step
        self.column = 0  # the cache position of the next step, on the host
        self.rows = 0
        self.compiled, self.cuda_graph, self.why_not_graph = compile, None, ""
        self.fwd = self._step_logits
        if compile:
            from inferlab.config import GRAPH_MODES

            mode = GRAPH_MODES[compile_mode] if graph else compile_mode
            self.fwd = torch.compile(self._step_logits, mode=mode, fullgraph=False, dynamic=False)
        self.graph_wanted = graph and device.type == "cuda"
        self.marks = compile and not graph and device.type == "cuda"  # inductor's own graphs

    def _step_logits(self, tok, mask, pos, at):
        return self.model(input_ids=tok, attention_mask=mask, position_ids=pos, cache_position=at,
                          past_key_values=self.cache, use_cache=True).logits[:, -1, :]

    def _step(self) -> None:
        self.logits.copy_(self.fwd(self.tok, self.mask, self.pos, self.at))

    def prepare(self) -> None:
        """A first batch, then the step compiled and captured (minutes on a GPU: at start-up, not in
        the first request). A step that cannot be captured runs as is, and says why."""
        import torch

        ids = torch.full((1, 2), self.pad, dtype=torch.long, device=self.device)
        first = self.start(ids, torch.ones_like(ids))
        self.logits = torch.empty((self.lanes, first.shape[-1]), dtype=first.dtype,
                                  device=self.device)
        if not self.graph_wanted:
            return
        from inferlab.backends.hf_decode import capture

        try:
            self.cuda_graph = capture(self._step)
        except Exception as e:  # noqa: BLE001 - the step still runs, uncaptured
            self.why_not_graph = f"{type(e).__name__}: {str(e)[:200]}"
            log.warning("the decode step could not be captured as a CUDA graph (%s); it runs "
                        "without one", self.why_not_graph)
            torch.cuda.synchronize()

    def start(self, ids, mask):
        import torch

        n, w = ids.shape
        if w >= self.length:
            raise ValueError(f"a prompt of {w} tokens does not fit the static cache's {self.length}")
        full = torch.full((self.lanes, w), self.pad, dtype=torch.long, device=self.device)
        full[:n] = ids
        cols = torch.ones((self.lanes, w), dtype=torch.long, device=self.device)
        cols[:n] = mask
        with torch.inference_mode():
            self.cache.reset()
        self.mask.zero_()
        self.mask[:, :w] = cols
        pos = (cols.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=full, attention_mask=self.mask, position_ids=pos,
                         cache_position=torch.arange(w, device=self.device),
                         past_key_values=self.cache, use_cache=True).logits[:, -1, :]
        self.pos.copy_(pos[:, -1:])
        self.column, self.rows = w, n
        return out[:n]

    def next(self, tokens: list[int]):
        import torch

        if self.column >= self.length:
            raise ValueError(f"the static cache's {self.length} positions are full")
        self.tok[:self.rows, 0] = torch.tensor(tokens, device=self.device)
        self.mask[:, self.column] = 1
        self.at.fill_(self.column)
        self.pos.add_(1)
        self.column += 1
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        else:
            if self.marks:
                torch.compiler.cudagraph_mark_step_begin()
            self._step()
        return self.logits[:self.rows]


class HFEngine(Engine):
    """transformers: requests that wait together are decoded as one left-padded batch, each
    sequence with its own sampling, stop strings and length; a finished or cancelled sequence
    stops emitting at once and the batch ends when all have."""

    runtime = "hf"

    def __init__(self, model_dir: str, precision: str, device: str, max_queue: int, max_batch: int,
                 batch_wait_ms: float, n_threads: int = 0, point: dict[str, Any] | None = None,
                 n_ctx: int = 2048):
        """point: the benchmark point's settings served beside precision (KV cache, compile,
        decode loop; gemv, fuse_*, inductor, attn: how the model is loaded)."""
        # the queue holds at least one whole batch: fewer would refuse requests the next batch takes
        super().__init__(max(max_queue, max_batch))
        if max_batch > max_queue:
            log.info("the queue holds %d requests (one batch; serve.max_queue is %d)", max_batch,
                     max_queue)
        import torch

        from inferlab.backends.hf import HFBackend

        point = dict(point or {})
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        load = {k: point[k] for k in LOAD_KEYS if point.get(k) is not None}
        self.backend = HFBackend({"attn": "sdpa", **load, "model_dir": model_dir,
                                  "precision": precision, "device": device, "threads": n_threads,
                                  "kv_cache": "dynamic",
                                  "compute_dtype": "fp16" if device == "cuda" else "bf16"})
        self.backend.load()
        self.model, self.tok = self.backend.model, self.backend.tokenizer
        self.device = self.backend.device
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.lanes = max_batch
        self.context_window = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        if getattr(self.tok, "chat_template", None):
            self.chat_template = lambda msgs: self.tok.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=False)
        loop, why = served_loop(point)
        self.static: StaticSteps | None = None
        if loop != "dynamic":
            # the static cache holds the served context
            self.context_window = min(self.context_window, n_ctx)
            self.static = StaticSteps(self.model, self.device, max_batch, self.context_window,
                                      self.pad, bool(point.get("compile")),
                                      point.get("compile_mode") or "reduce-overhead",
                                      graph=loop == "graph")
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.static.prepare()
            log.info("static cache of %d rows x %d positions ready in %.1f s (compiled: %s, CUDA "
                     "graph: %s)", max_batch, self.context_window, time.perf_counter() - t0,
                     self.static.compiled, self.static.cuda_graph is not None)
        if why:
            log.info("%s", why)
        self.description = {"runtime": "hf", "precision": precision, "device": device,
                            "max_batch": max_batch, "context_window": self.context_window,
                            "kv_cache": "dynamic" if self.static is None else "static",
                            "decode": {"dynamic": "generate", "static": "generate",
                                       "graph": "graph"}[loop],
                            "compile": bool(self.static and self.static.compiled),
                            "cuda_graph": bool(self.static and self.static.cuda_graph is not None),
                            **({"served_as": why} if why else {}),
                            **({"why_no_cuda_graph": self.static.why_not_graph}
                               if self.static and self.static.why_not_graph else {}),
                            **{k: v for k, v in load.items() if k not in ("attn", "device")}}

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
            if not self._fits(batch + [nxt]):
                self.held.append(nxt)  # the next batch's first
                break
            batch.append(nxt)
        return batch

    def _fits(self, batch: list[GenRequest]) -> bool:
        """A static cache holds the longest prompt (left padding) plus the most tokens asked."""
        if self.static is None:
            return True
        width = max(len(r.prompt_ids) for r in batch)
        return width + max(r.max_tokens for r in batch) <= self.context_window

    @staticmethod
    def _pick(logits, req: GenRequest, gen) -> int:
        """One token: greedy at temperature 0 (the engine floors tiny temperatures to 0), else
        nucleus sampling. The most likely token is always kept, so no top_p, however small,
        leaves nothing to sample from."""
        import torch

        if req.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            # the smallest set reaching top_p
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p
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
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids
                            for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                             for r in batch], device=self.device)
        gens = []
        for r in batch:
            g = torch.Generator(device="cpu")
            # its own generator: one request's seed never touches another's sample
            g.manual_seed(r.seed)
            gens.append(g)
        asms = [TextAssembler(self.decode, r.stop) for r in batch]
        counts = [0] * len(batch)
        active = [True] * len(batch)
        steps = self.static or DynamicSteps(self.model, self.device)
        with torch.inference_mode():
            logits = steps.start(ids, mask)
            while True:
                nxt = self._next_tokens(batch, logits, gens, asms, counts, active)
                if not any(active):
                    break
                logits = steps.next(nxt)

    def _next_tokens(self, batch, logits, gens, asms, counts, active) -> list[int]:
        """Each active request's next token, emitted; the finished ones finished."""
        greedy = logits.argmax(-1).tolist()  # one small copy; sampled rows copy their logits
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
                tok = (greedy[i] if r.temperature <= 0
                       else self._pick(logits[i].float().cpu(), r, gens[i]))
            except Exception as e:
                # this request fails alone; the others in the batch go on
                active[i] = False
                _fail(r, e)
                nxt.append(self.pad)
                continue
            nxt.append(tok)
            if tok == self.eos and not r.ignore_eos:
                active[i] = False
                _finish(r, asms[i], counts[i], "stop")
                continue
            counts[i] += 1
            self._tick(r)
            r.emit("text", asms[i].add(tok))  # one event per token
            if asms[i].stopped or counts[i] >= r.max_tokens:
                active[i] = False
                _finish(r, asms[i], counts[i], "stop" if asms[i].stopped else "length")
        return nxt
