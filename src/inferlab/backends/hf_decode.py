"""transformers' decode paths, timed: generate() with a step timer, and the loops of this project
over one static KV cache (gpt-fast style: prefill, one step, n steps).

- the fast loop: generate() does host work and a device-to-host sync every step (stopping criteria,
  streamer), so at batch 1 the GPU waits for Python. This loop keeps the whole decode on the
  device: a static KV cache, one compiled step (forward + argmax; mode reduce-overhead captures it
  as a CUDA graph) fed by the previous step's output tensor, no sync until the end. Step times come
  from CUDA events recorded after each step and read once at the end (device timestamps, not a host
  clock racing the GPU).
- the graph loop: one decode step (compiled forward + argmax, then the step's bookkeeping: next
  input, output column, position) captured once as a CUDA graph over static buffers; a request is
  the prefill and then one graph.replay() per token. The host does nothing else per token, so
  Python and dynamo guards leave the critical path. Without CUDA the same step runs eagerly (the
  correctness path the tests take).
- decode: kernels: the graph loop over a hand-written step (backends/decode_step.py, Phi's fused
  block or Llama's layers at batch 1) instead of the model's compiled forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from inferlab.backends.base import BackendUnavailable
from inferlab.backends.timing import RequestTiming
from inferlab.config import GRAPH_MODES


class StepTimer:
    """A transformers streamer that timestamps every generation step (the first put() is the
    prompt)."""

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


class StepClock:
    """When each token of a decode loop became available: CUDA events recorded on the stream (read
    once at the end, no host sync per token) or, on the CPU, where ops are synchronous, the host
    clock."""

    def __init__(self, cuda: bool, n: int):
        import torch

        self.cuda = cuda
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)] if cuda else []
        self.host: list[float] = []
        self.origin = 0.0

    def start(self) -> None:
        self.origin = time.perf_counter()
        if self.cuda:
            self.events[0].record()

    def mark(self, i: int) -> None:
        if self.cuda:
            self.events[i].record()
        else:
            self.host.append(time.perf_counter())

    def times(self) -> list[float]:
        """After a device sync: one host-clock time per marked token."""
        if not self.cuda:
            return self.host
        return [self.origin + self.events[0].elapsed_time(e) / 1000 for e in self.events[1:]]


def generate_request(model, device, sync, prompts: list[list[int]],
                     kwargs: dict[str, Any]) -> RequestTiming:
    """One batch through transformers' generate(), every step timed as the streamer receives it."""
    import torch

    ids = torch.tensor(prompts, device=device)
    timer = StepTimer(sync)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=timer,
                             **kwargs)
    sync()
    end = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    return RequestTiming(start, timer.times, end, ids.shape[1], generated, ids.shape[0],
                         output_ids=out[:, ids.shape[1]:].tolist())


def equal_lengths(prompts: list[list[int]], loop: str) -> tuple[int, int]:
    """(batch, prompt length) of prompts a decode loop can take: of equal length (no padding)."""
    b, n_prompt = len(prompts), len(prompts[0])
    if any(len(p) != n_prompt for p in prompts):
        raise BackendUnavailable(
            f"the {loop} decode loop takes prompts of equal length (no padding)"
        )
    return b, n_prompt


def step_kernels_run(device) -> str:
    """What runs decode: kernels' kernels here (each point records it): "triton" on CUDA.

    On the CPU "torch reference", or "triton, interpreted" under TRITON_INTERPRET=1 (slow)."""
    from inferlab.backends import kernels

    if device.type == "cuda":
        return "triton"
    return "triton, interpreted" if kernels.interpreted() else "torch reference"


def capture(step: Callable[[], None], before: Callable[[], None] = lambda: None):
    """One call of `step` captured as a CUDA graph, after three calls on a side stream (compile and
    warm-up stay off the capture); `before` runs ahead of each warm-up call."""
    import torch

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                before()
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph


class StaticDecoder:
    """The fast and the graph decode loops over the one static KV cache they share. All their state
    is made here, empty, and filled for a request's shape: a new shape makes a new cache, and what
    was compiled or captured over the old one is built again."""

    def __init__(self, model, device, sync: Callable[[], None], settings: dict[str, Any],
                 prefilled: Callable[[], None]):
        self.model, self.device, self.sync = model, device, sync
        self.settings = settings  # the backend's (a reused worker updates them in place)
        self.prefilled = prefilled  # called once the prefill is queued (the profiler starts there)
        self.cache = None  # transformers' StaticCache
        self.cache_shape: tuple[int, int] | None = None  # (batch, max length)
        self.step: Callable | None = None  # the fast loop's step, compiled or eager
        self.step_key: tuple | None = None  # (compile, mode, inductor) it was made for
        self.graph = None  # the graph loop's captured step (CUDA only)
        self.graph_step: Callable | None = None  # the same step, run eagerly without a graph
        self.graph_key: tuple | None = None  # the shape and compile settings it was made for
        self.tok = self.pos = self.idx = self.out = None  # the graph's static buffers
        self.kernel_step = None  # decode: kernels' hand-written step (decode_step.py), once made

    def next_token(self, ids, pos):
        """Greedy next token of each sequence after ids (positions pos, shape [1, n]) on the static
        cache."""
        return self.step_logits(ids, pos).argmax(-1, keepdim=True)

    def prefill(self, ids):
        import torch

        return self.next_token(ids, torch.arange(ids.shape[1], device=self.device).unsqueeze(0))

    def static_cache(self, b: int, max_len: int) -> None:
        from transformers import StaticCache

        if self.cache_shape != (b, max_len):
            self.cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            self.cache_shape = (b, max_len)
            self.step_key = self.graph_key = None

    def compiled(self, mode: str, fn: Callable | None = None):
        """fn (default next_token) under torch.compile in `mode`, with the point's inductor options
        (settings "inductor", comma-separated) switched on over the mode's own."""
        import torch

        fn = fn or self.next_token
        flags = [f.strip() for f in (self.settings.get("inductor") or "").split(",") if f.strip()]
        if not flags:
            return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **dict.fromkeys(flags, True)}
        return torch.compile(fn, options=options, fullgraph=False, dynamic=False)

    def fast_step(self):
        key = (self.settings.get("compile"), self.settings.get("compile_mode", "reduce-overhead"),
               self.settings.get("inductor"))
        if self.step_key != key:
            self.step = self.compiled(key[1]) if key[0] else self.next_token
            self.step_key = key
        return self.step

    def fast_request(self, prompts: list[list[int]], new_tokens: int) -> RequestTiming:
        import torch

        b, n_prompt = equal_lengths(prompts, "fast")
        self.static_cache(b, n_prompt + new_tokens)
        with torch.inference_mode():  # the cache's tensors are made in inference mode
            self.cache.reset()
        step = self.fast_step()
        ids = torch.tensor(prompts, device=self.device)
        positions = torch.arange(n_prompt + new_tokens, device=self.device).unsqueeze(0)
        cuda = self.device.type == "cuda"
        clock = StepClock(cuda, new_tokens)
        out = torch.empty((b, new_tokens), dtype=torch.long, device=self.device)
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            clock.start()
            tok = self.prefill(ids)
            out[:, :1] = tok
            self.prefilled()
            for i in range(1, new_tokens + 1):
                clock.mark(i)
                if i == new_tokens:
                    break
                if cuda and self.step_key[0]:  # type: ignore[index]
                    # the previous step's graph outputs are consumed
                    torch.compiler.cudagraph_mark_step_begin()
                tok = step(tok.clone(), positions[:, n_prompt + i - 1: n_prompt + i])
                out[:, i: i + 1] = tok
        self.sync()
        end = time.perf_counter()
        return RequestTiming(start, clock.times(), end, n_prompt, new_tokens, b,
                             output_ids=out.tolist())

    def _step_settings(self) -> tuple:
        """The settings a made step depends on, beside its shape."""
        s = self.settings
        return (s.get("decode"), s.get("compile"), s.get("compile_mode"), s.get("inductor"))

    def graph_setup(self, b: int, max_len: int, new_tokens: int) -> None:
        import torch

        s = self.settings
        key = (b, max_len, new_tokens, *self._step_settings())
        self.static_cache(b, max_len)
        if self.graph_key == key:
            return
        if s.get("decode") == "kernels" and b != 1:
            raise BackendUnavailable("decode: kernels runs batch 1 (its kernels take one row)")
        self.graph_key, self.graph = None, None  # set once the step is made (a failure: again)
        dev = self.device
        self.tok = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.idx = torch.zeros((1,), dtype=torch.long, device=dev)
        self.out = torch.zeros((b, new_tokens), dtype=torch.long, device=dev)
        if s.get("decode") == "kernels":
            fwd = self.kernels(max_len)
        elif s.get("compile"):
            fwd = self.compiled(GRAPH_MODES[s.get("compile_mode", "default")])
        else:
            fwd = self.next_token

        def step():
            nxt = fwd(self.tok, self.pos)
            self.tok.copy_(nxt)
            self.out.index_copy_(1, self.idx.clamp(max=new_tokens - 1), nxt)
            self.pos.add_(1)
            self.idx.add_(1)

        self.graph_step = step
        if dev.type != "cuda":
            self.graph_key = key
            return
        with torch.inference_mode():
            self.prefill(torch.zeros((b, max_len - new_tokens), dtype=torch.long, device=dev))
        self.graph, self.graph_key = capture(step), key

    def kernels(self, max_len: int) -> Callable:
        """decode: kernels' step over the static cache (bound once a prefill filled it)."""
        from inferlab.backends import kernels
        from inferlab.backends.decode_step import DecodeStep

        # the references read the position on the host, which a CUDA graph cannot
        if self.device.type == "cuda" and not kernels.available():
            raise BackendUnavailable(
                "decode: kernels on CUDA runs Triton kernels: the triton package is missing"
            )
        if self.kernel_step is None:
            s = self.settings
            triton = step_kernels_run(self.device) != "torch reference"
            self.kernel_step = DecodeStep(self.model, triton=triton,
                                          int4_gemv=s.get("int4_gemv") or "rows",
                                          fuse_norm=bool(s.get("fuse_norm")),
                                          fuse_attention=bool(s.get("fuse_attention")))
        made = self.kernel_step

        def step(tok, pos):
            made.bind(self.cache, max_len)
            return made(tok, pos)

        return step

    def forced_setup(self, b: int, max_len: int) -> None:
        """The timed loop's step made to emit logits: each step reads its token from `self.ids`
        (teacher forcing) and writes the logits into `self.rows`; captured as a CUDA graph for the
        graph and kernels loops, as the timed step is."""
        import torch

        s = self.settings
        key = ("forced", b, max_len, *self._step_settings())
        self.static_cache(b, max_len)
        if self.graph_key == key:
            return
        self.graph_key, self.graph = None, None
        dev, decode = self.device, s.get("decode")
        vocab = self.model.config.vocab_size
        with torch.inference_mode():  # the static cache's tensors are made by a first forward
            self.prefill(torch.zeros((b, 1), dtype=torch.long, device=dev))
        self.ids = torch.zeros((b, max_len + 1), dtype=torch.long, device=dev)
        self.rows = torch.zeros((max_len, vocab), dtype=torch.float32, device=dev)
        self.tok = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.idx = torch.zeros((1,), dtype=torch.long, device=dev)
        if decode == "kernels":
            kernel_step = self.kernels(max_len)

            def fwd(tok, pos):
                kernel_step(tok, pos)
                return self.kernel_step.logits.view(1, -1)
        elif s.get("compile"):
            mode = s.get("compile_mode", "reduce-overhead")
            fwd = self.compiled(GRAPH_MODES[mode] if decode != "fast" else mode, self.step_logits)
        else:
            fwd = self.step_logits

        def step():
            self.tok.copy_(self.ids.index_select(1, self.idx))
            self.rows.index_copy_(0, self.idx, fwd(self.tok, self.pos)[:1].float())
            self.pos.add_(1)
            self.idx.add_(1)

        self.graph_step = step
        if dev.type != "cuda" or decode == "fast":  # the fast loop's graphs are inductor's own
            self.graph_key = key
            return

        def rewind():  # each warm-up step at the first position, within the cache
            self.pos.zero_()
            self.idx.zero_()

        self.graph, self.graph_key = capture(step, rewind), key

    def step_logits(self, ids, pos):
        """The step's logits of the last position (the forward next_token takes the argmax of)."""
        logits = self.model(input_ids=ids, position_ids=pos.expand(ids.shape[0], -1),
                            cache_position=pos[0], past_key_values=self.cache,
                            use_cache=True).logits
        return logits[:, -1]

    def forced_logprobs(self, ids: list[int], batch: int = 1):
        """float32 (len(ids), vocabulary) next-token log-probabilities from the loop's own step.

        Fed one position at a time (no prefill). At batch > 1 every row holds the same sequence,
        so the step runs the kernels its batch was timed with."""
        import torch

        n = len(ids)
        window = int(self.settings.get("tokens_window") or n)
        self.forced_setup(batch, max(n, window))  # one shape for all windows
        with torch.inference_mode():
            self.cache.reset()
            self.ids[:, :n] = torch.tensor(ids, device=self.device)
            self.pos.zero_()
            self.idx.zero_()
            for _ in range(n):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    if self.device.type == "cuda" and self.settings.get("compile"):
                        torch.compiler.cudagraph_mark_step_begin()
                    self.graph_step()  # type: ignore[misc]
            return torch.log_softmax(self.rows[:n], dim=-1).cpu().numpy()

    def graph_request(self, prompts: list[list[int]], new_tokens: int) -> RequestTiming:
        import torch

        b, n_prompt = equal_lengths(prompts, self.settings.get("decode") or "graph")
        cuda = self.device.type == "cuda"
        self.sync()
        start = time.perf_counter()  # a shape's first request counts its compile and capture
        self.graph_setup(b, n_prompt + new_tokens, new_tokens)
        self.sync()
        setup_s = time.perf_counter() - start
        ids = torch.tensor(prompts, device=self.device)
        clock = StepClock(cuda, new_tokens)
        with torch.inference_mode():
            clock.start()
            self.cache.reset()
            first = self.prefill(ids)
            self.tok.copy_(first)
            self.out[:, :1] = first
            self.pos.fill_(n_prompt)
            self.idx.fill_(1)
            self.prefilled()
            for i in range(1, new_tokens + 1):
                clock.mark(i)
                if i == new_tokens:
                    break
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.graph_step()  # type: ignore[misc]
        self.sync()
        end = time.perf_counter()
        internal = {"setup_s": setup_s}
        if self.settings.get("decode") == "kernels" and self.kernel_step.launches is not None:
            # counted in its last eager call (the captured one)
            internal["step_launches"] = self.kernel_step.launches
        return RequestTiming(start, clock.times(), end, n_prompt, new_tokens, b,
                             internal=internal, output_ids=self.out.tolist())
