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
from inferlab.backends.timing import RequestTiming
from inferlab.config import BNB_PRECISIONS as BNB
from inferlab.config import FLOAT_DTYPES as DTYPES
from inferlab.config import GRAPH_MODES, INT4_INDUCTOR, INT4_KERNELS, fuse_problem
from inferlab.config import TORCHAO_PRECISIONS as TORCHAO

log = logging.getLogger(__name__)


def _tensor_bytes(t) -> int:
    """Bytes a tensor holds in memory: for tensor subclasses that pack their data (torchao's quantized weights),
    the sum over the inner tensors they are made of, not their logical (unpacked) size."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, n) for n in names]
        if inner and all(hasattr(x, "element_size") for x in inner):
            return sum(_tensor_bytes(x) for x in inner)
    return t.nelement() * t.element_size()


def stored_bytes(model) -> int:
    """Bytes of a model's parameters and buffers as stored (bitsandbytes' and torchao's packed weights with their
    scales); transformers' get_memory_footprint() counts a torchao weight at its unpacked size."""
    return sum(_tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))


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


class StepClock:
    """When each token of a decode loop became available: CUDA events recorded on the stream (read once at the
    end, no host sync per token) or, on the CPU, where ops are synchronous, the host clock."""

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
        fuse = "block" if s.get("fuse_block") else "qkv" if s.get("fuse_qkv") else None
        if fuse_problem(fuse, precision):  # before any loading
            raise ValueError(f"{fuse_problem(fuse, precision)}; fusing applies to fp32, fp16, bf16, int8-ao, int4-ao "
                             "and int4-inductor")
        if s.get("threads"):
            torch.set_num_threads(int(s["threads"]))
        kwargs: dict[str, Any] = {"attn_implementation": s.get("attn", "sdpa")}
        self.quant_detail: str | None = None  # what torchao was asked for, recorded with the load figures
        quantize = None  # quantized after loading (and fusing), block by block on the device
        if precision in BNB:
            kwargs.update(self._bnb_kwargs(precision, s.get("compute_dtype", "bf16"), device))
        elif precision in TORCHAO:
            kwargs.update(self._torchao_kwargs(precision, device))
            # loaded in bf16 on the CPU (and fused), then quantized layer by layer on the device; int4 always, so
            # that each layer gets the largest group its row divides (one group size for all would leave in 16
            # bits every layer it does not divide: SmolLM2's 576-wide rows and 128)
            if fuse or precision == "int4-ao":
                quantize = self._torchao_quantizer(kwargs.pop("quantization_config").quant_type)
                kwargs["device_map"] = "cpu"
        elif precision == INT4_INDUCTOR:  # fp16 activations on CUDA (fp32 on the CPU, where fp16 math is slow)
            kwargs.update(dtype=torch.float16 if device == "cuda" else torch.float32, device_map="cpu")
            from inferlab.backends.int4 import quantize_int4 as quantize
        else:
            kwargs["dtype"] = getattr(torch, DTYPES[precision])
            if device == "cuda":
                kwargs["device_map"] = {"": 0}
        self.device = torch.device("cuda:0" if device == "cuda" else "cpu")
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(s["model_dir"], **kwargs).eval()
        fused = 0
        if fuse == "block":
            from inferlab.backends.fuse import fuse_parallel_block

            fused = fuse_parallel_block(self.model, matvec_projections=precision not in TORCHAO)
        elif fuse == "qkv":
            from inferlab.backends.fuse import fuse_qkv

            fused = fuse_qkv(self.model)
        if quantize is not None:
            self._quantize_on_device(quantize)
        if precision in INT4_KERNELS:  # what the model really got: group sizes, layers kept
            from inferlab.backends.int4 import describe, group_sizes

            self.quant_detail = describe(self.model, torchao=precision == "int4-ao")
            int4_groups = group_sizes(self.model)
        gemv = self._use_triton_gemv() if s.get("gemv") == "triton" else 0
        self.sync()
        load_s = time.perf_counter() - t0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.model.generation_config.pad_token_id = pad
        # bytes of the weights as stored (packed 4-bit weights and their scales included)
        out = {"load_s": load_s, "weight_bytes": stored_bytes(self.model), "weight_bytes_method": "storage"}
        if self.quant_detail:
            out["quantization"] = self.quant_detail
        if precision in INT4_KERNELS:
            out["int4_group_sizes"] = int4_groups  # projections per group size the model really got
        if fused:
            out[f"fused_{fuse}_layers"] = fused
        if gemv:
            out["triton_gemv_layers"] = gemv
        return out

    def _use_triton_gemv(self) -> int:
        """gemv: triton. Every projection still in 16 bits becomes a MatVecLinear and it and every int4-inductor
        layer run backends/kernels.py's Triton GEMV at one row; returns how many layers do. torchao's and
        bitsandbytes' quantized layers keep their own kernels."""
        import torch

        from inferlab.backends import kernels
        from inferlab.backends.fuse import _block_modules, matvec_linear, swap_children
        from inferlab.backends.int4 import _module as int4_module

        if self.device.type != "cuda" or not kernels.available():
            raise BackendUnavailable("gemv: triton runs Triton kernels, which need CUDA and the triton package")
        kernels.prepare()
        matvec, int4 = _block_modules()[0], int4_module()

        def swap(m):
            m = matvec_linear(m) if type(m) is torch.nn.Linear else m
            if type(m) in (matvec, int4):
                m.kernel = "triton"
                return m
            return None

        swap_children(self.model, swap)
        return sum(getattr(m, "kernel", None) == "triton" for m in self.model.modules())

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

    def _torchao_kwargs(self, precision: str, device: str) -> dict[str, Any]:
        """torchao weight-only: int8 (per channel) or int4 (the tinygemm kernel on CUDA; group size 128, or the
        largest of 64 and 32 a layer's row divides: _torchao_quantizer)."""
        import torch

        try:
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
            from transformers import TorchAoConfig
        except ImportError as e:
            raise BackendUnavailable(f"torchao is not installed ({e}): pip install torchao") from e
        if precision == "int4-ao":
            if device != "cuda":
                raise BackendUnavailable("int4-ao uses torchao's tinygemm int4 kernel, which needs CUDA")
            try:  # torchao >= 0.13 names the tinygemm layout; older ones take version=1
                quant = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
            except TypeError:
                quant = Int4WeightOnlyConfig(group_size=128)
        else:
            quant = Int8WeightOnlyConfig()
        self.quant_detail = f"torchao {type(quant).__name__}: {quant}"[:300]
        return {"quantization_config": TorchAoConfig(quant_type=quant), "dtype": torch.bfloat16,
                "device_map": {"": 0} if device == "cuda" else "cpu"}

    @staticmethod
    def _torchao_quantizer(quant):
        def apply(block, skip):
            import dataclasses

            import torch
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            from inferlab.backends.int4 import GROUP_SIZES, torchao_group_size

            def linear(m) -> bool:
                return isinstance(m, torch.nn.Linear) and id(m) not in skip

            if not isinstance(quant, Int4WeightOnlyConfig):  # int8: per channel
                quantize_(block, quant, filter_fn=lambda m, fqn: linear(m))
                return
            for g in GROUP_SIZES:  # int4: each layer with the largest group its row divides
                quantize_(block, dataclasses.replace(quant, group_size=g),
                          filter_fn=lambda m, fqn, g=g: linear(m) and torchao_group_size(m.in_features) == g)

        return apply

    def _quantize_on_device(self, apply) -> None:
        """Weight-only quantization of a model loaded on the CPU: each block of its layer lists moves to the device
        and is quantized there (`apply(block, skip_ids)`), then the rest follows, so the device never holds more
        than one block in 16 bits (the peak a quantizing load has). The output head stays in 16 bits, as
        TorchAoConfig keeps it."""
        import torch

        head = self.model.get_output_embeddings()
        done: set[int] = {id(head)}
        blocks = [b for lst in self.model.modules() if isinstance(lst, torch.nn.ModuleList) for b in lst]
        for block in [*blocks, self.model]:
            block.to(self.device)
            apply(block, set(done))
            done.update(id(m) for m in block.modules())

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

        if self.settings.get("decode") == "graph":
            if past_key_values is not None:
                raise BackendUnavailable("the graph decode loop does not take a precomputed prefix cache")
            return self._graph_request(prompts, new_tokens)
        if self.settings.get("decode") == "fast":
            if past_key_values is not None:
                raise BackendUnavailable("the fast decode loop does not take a precomputed prefix cache")
            return self._fast_request(prompts, new_tokens)
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

    # -- the fast decode loop --------------------------------------------------------------------------------
    # generate() does host work and a device-to-host sync every step (stopping criteria, streamer), so at batch
    # 1 the GPU waits for Python. This loop keeps the whole decode on the device: a static KV cache, one
    # compiled step (forward + argmax; mode reduce-overhead captures it as a CUDA graph) fed by the previous
    # step's output tensor, no sync until the end. Step times come from CUDA events recorded after each step
    # and read once at the end (device timestamps, not a host clock racing the GPU).

    def _next_token(self, ids, pos):
        """Greedy next token of each sequence after ids (positions pos, shape [1, n]) on the static cache."""
        logits = self.model(input_ids=ids, position_ids=pos.expand(ids.shape[0], -1), cache_position=pos[0],
                            past_key_values=self._cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _prefill(self, ids):
        import torch

        return self._next_token(ids, torch.arange(ids.shape[1], device=self.device).unsqueeze(0))

    after_prefill = None  # called once the prefill is queued (the profiler starts there); None: nothing

    def _prefilled(self) -> None:
        if self.after_prefill is not None:
            self.after_prefill()

    def _static_cache(self, b: int, max_len: int) -> None:
        """The one static KV cache of both loops: a new one per shape, and then what was compiled or captured
        over the old one (the fast loop's step, the graph) is built again."""
        from transformers import StaticCache

        if getattr(self, "_cache_shape", None) != (b, max_len):
            self._cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            self._cache_shape = (b, max_len)
            self._step_key = self._graph_key = None

    def _compiled(self, mode: str):
        """self._next_token under torch.compile in `mode`, with the point's inductor options (settings
        "inductor", comma-separated) switched on over the mode's own."""
        import torch

        flags = [f.strip() for f in (self.settings.get("inductor") or "").split(",") if f.strip()]
        if not flags:
            return torch.compile(self._next_token, mode=mode, fullgraph=False, dynamic=False)
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **dict.fromkeys(flags, True)}
        return torch.compile(self._next_token, options=options, fullgraph=False, dynamic=False)

    def _fast_step(self):
        key = (self.settings.get("compile"), self.settings.get("compile_mode", "reduce-overhead"),
               self.settings.get("inductor"))
        if getattr(self, "_step_key", None) != key:
            self._step = self._compiled(key[1]) if key[0] else self._next_token
            self._step_key = key
        return self._step

    def _fast_request(self, prompts: list[list[int]], new_tokens: int) -> RequestTiming:
        import torch

        b, n_prompt = len(prompts), len(prompts[0])
        if any(len(p) != n_prompt for p in prompts):
            raise BackendUnavailable("the fast decode loop takes prompts of equal length (no padding)")
        self._static_cache(b, n_prompt + new_tokens)
        with torch.inference_mode():  # the cache's tensors are made in inference mode
            self._cache.reset()
        step = self._fast_step()
        ids = torch.tensor(prompts, device=self.device)
        positions = torch.arange(n_prompt + new_tokens, device=self.device).unsqueeze(0)
        cuda = self.device.type == "cuda"
        clock = StepClock(cuda, new_tokens)
        out = torch.empty((b, new_tokens), dtype=torch.long, device=self.device)
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            clock.start()
            tok = self._prefill(ids)
            out[:, :1] = tok
            self._prefilled()
            for i in range(1, new_tokens + 1):
                clock.mark(i)
                if i == new_tokens:
                    break
                if cuda and self._step_key[0]:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
                tok = step(tok.clone(), positions[:, n_prompt + i - 1: n_prompt + i])
                out[:, i: i + 1] = tok
        self.sync()
        end = time.perf_counter()
        return RequestTiming(start, clock.times(), end, n_prompt, new_tokens, b, output_ids=out.tolist())

    # -- the graph decode loop -------------------------------------------------------------------------------
    # One decode step (compiled forward + argmax, then the step's bookkeeping: next input, output column,
    # position) captured once as a CUDA graph over static buffers; a request is the prefill and then one
    # graph.replay() per token. The host does nothing else per token, so Python and dynamo guards leave the
    # critical path. Without CUDA the same step runs eagerly (the correctness path the tests take).

    def _graph_setup(self, b: int, max_len: int, new_tokens: int) -> None:
        import torch

        s = self.settings
        key = (b, max_len, new_tokens, s.get("compile"), s.get("compile_mode"), s.get("inductor"))
        self._static_cache(b, max_len)
        if getattr(self, "_graph_key", None) == key:
            return
        self._graph_key, self._graph = key, None
        dev = self.device
        self._tok = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self._idx = torch.zeros((1,), dtype=torch.long, device=dev)
        self._out = torch.zeros((b, new_tokens), dtype=torch.long, device=dev)

        fwd = self._compiled(GRAPH_MODES[s.get("compile_mode", "default")]) if s.get("compile") else self._next_token

        def step():
            nxt = fwd(self._tok, self._pos)
            self._tok.copy_(nxt)
            self._out.index_copy_(1, self._idx.clamp(max=new_tokens - 1), nxt)
            self._pos.add_(1)
            self._idx.add_(1)

        self._step_fn = step
        if dev.type != "cuda":
            return
        with torch.inference_mode():  # compile and warm up off the capture, then capture one step
            self._prefill(torch.zeros((b, max_len - new_tokens), dtype=torch.long, device=dev))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        self._graph = graph

    def _graph_request(self, prompts: list[list[int]], new_tokens: int) -> RequestTiming:
        import torch

        b, n_prompt = len(prompts), len(prompts[0])
        if any(len(p) != n_prompt for p in prompts):
            raise BackendUnavailable("the graph decode loop takes prompts of equal length (no padding)")
        cuda = self.device.type == "cuda"
        self.sync()
        start = time.perf_counter()  # compile and capture (first request of a shape) count in this request
        self._graph_setup(b, n_prompt + new_tokens, new_tokens)
        self.sync()
        setup_s = time.perf_counter() - start
        ids = torch.tensor(prompts, device=self.device)
        clock = StepClock(cuda, new_tokens)
        with torch.inference_mode():
            clock.start()
            self._cache.reset()
            first = self._prefill(ids)
            self._tok.copy_(first)
            self._out[:, :1] = first
            self._pos.fill_(n_prompt)
            self._idx.fill_(1)
            self._prefilled()
            for i in range(1, new_tokens + 1):
                clock.mark(i)
                if i == new_tokens:
                    break
                if self._graph is not None:
                    self._graph.replay()
                else:
                    self._step_fn()
        self.sync()
        end = time.perf_counter()
        return RequestTiming(start, clock.times(), end, n_prompt, new_tokens, b, internal={"setup_s": setup_s},
                             output_ids=self._out.tolist())

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

    def logprobs(self, ids: list[int]):
        import torch

        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=x, use_cache=False).logits[0].float()
            return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def unload(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
