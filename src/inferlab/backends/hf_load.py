"""Loading a transformers model at a precision: the bitsandbytes and torchao recipes,
int4-inductor, fused projections and the Triton GEMV. `load(settings)` returns everything the
decode paths need, made in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferlab.backends.base import BackendUnavailable
from inferlab.config import BNB_PRECISIONS as BNB
from inferlab.config import FLOAT_DTYPES as DTYPES
from inferlab.config import INT4_INDUCTOR, INT4_KERNELS, fuse_problem
from inferlab.config import TORCHAO_PRECISIONS as TORCHAO


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: Any  # torch.device
    sync: Callable[[], None]  # waits for the device (a no-op on the CPU)
    figures: dict[str, Any]  # load_s, weight_bytes, what the quantization really gave, ...


def tensor_bytes(t) -> int:
    """Bytes a tensor holds in memory: for tensor subclasses that pack their data (torchao's
    quantized weights), the sum over the inner tensors they are made of, not their logical
    (unpacked) size."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, n) for n in names]
        if inner and all(hasattr(x, "element_size") for x in inner):
            return sum(tensor_bytes(x) for x in inner)
    return t.nelement() * t.element_size()


def stored_bytes(model) -> int:
    """Bytes of a model's parameters and buffers as stored (bitsandbytes' and torchao's packed
    weights with their scales); transformers' get_memory_footprint() counts a torchao weight at its
    unpacked size."""
    return sum(tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))


def load(s: dict[str, Any]) -> Loaded:
    """The model and tokenizer of settings `s` (model_dir, precision, compute_dtype, device, attn,
    threads, fuse_qkv / fuse_block, gemv), with the load figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = s.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("CUDA is not available on this machine")
    precision = s["precision"]
    fuse = "block" if s.get("fuse_block") else "qkv" if s.get("fuse_qkv") else None
    if fuse_problem(fuse, precision):  # before any loading
        raise ValueError(f"{fuse_problem(fuse, precision)}; fusing applies to fp32, fp16, bf16, "
                         "int8-ao, int4-ao and int4-inductor")
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    kwargs, quantize, detail = load_kwargs(precision, s.get("compute_dtype", "bf16"), device, fuse)
    kwargs["attn_implementation"] = s.get("attn", "sdpa")
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], **kwargs).eval()
    fused = fuse_projections(model, fuse, precision)
    if quantize is not None:
        quantize_on_device(model, dev, quantize)
    int4_groups = None
    if precision in INT4_KERNELS:  # what the model really got: group sizes, layers kept
        from inferlab.backends.int4 import describe, group_sizes

        detail = describe(model, torchao=precision == "int4-ao")
        int4_groups = group_sizes(model)
    gemv = use_triton_gemv(model, dev) if s.get("gemv") == "triton" else 0
    sync()
    load_s = time.perf_counter() - t0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad
    # bytes of the weights as stored (packed 4-bit weights and their scales included)
    out = {"load_s": load_s, "weight_bytes": stored_bytes(model), "weight_bytes_method": "storage"}
    if detail:
        out["quantization"] = detail
    if int4_groups is not None:
        out["int4_group_sizes"] = int4_groups  # projections per group size the model really got
    if fused:
        out[f"fused_{fuse}_layers"] = fused
    if gemv:
        out["triton_gemv_layers"] = gemv
    return Loaded(model, tokenizer, dev, sync, out)


def load_kwargs(precision: str, compute_dtype: str, device: str,
                fuse: str | None) -> tuple[dict[str, Any], Callable | None, str | None]:
    """from_pretrained's arguments for a precision, the quantizer to apply after loading (and
    fusing), block by block on the device (None: none), and what torchao was asked for."""
    import torch

    if precision in BNB:
        return bnb_kwargs(precision, compute_dtype, device), None, None
    if precision in TORCHAO:
        kwargs, detail = torchao_kwargs(precision, device)
        # loaded in bf16 on the CPU (and fused), then quantized layer by layer on the device; int4
        # always, so that each layer gets the largest group its row divides (one group size for all
        # would leave in 16 bits every layer it does not divide: SmolLM2's 576-wide rows and 128)
        if fuse or precision == "int4-ao":
            quantize = torchao_quantizer(kwargs.pop("quantization_config").quant_type)
            return {**kwargs, "device_map": "cpu"}, quantize, detail
        return kwargs, None, detail
    if precision == INT4_INDUCTOR:  # fp16 activations on CUDA (fp32 on the CPU: fp16 math is slow)
        from inferlab.backends.int4 import quantize_int4

        dtype = torch.float16 if device == "cuda" else torch.float32
        return {"dtype": dtype, "device_map": "cpu"}, quantize_int4, None
    kwargs: dict[str, Any] = {"dtype": getattr(torch, DTYPES[precision])}
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    return kwargs, None, None


def fuse_projections(model, fuse: str | None, precision: str) -> int:
    """fuse_block: Phi's parallel block as two matmuls; fuse_qkv: q, k and v as one. Returns the
    layers fused."""
    if fuse == "block":
        from inferlab.backends.fuse import fuse_parallel_block

        return fuse_parallel_block(model, matvec_projections=precision not in TORCHAO)
    if fuse == "qkv":
        from inferlab.backends.fuse import fuse_qkv

        return fuse_qkv(model)
    return 0


def use_triton_gemv(model, device) -> int:
    """gemv: triton. Every projection still in 16 bits becomes a MatVecLinear and it and every
    int4-inductor layer run backends/kernels.py's Triton GEMV at one row; returns how many layers
    do. torchao's and bitsandbytes' quantized layers keep their own kernels."""
    import torch

    from inferlab.backends import kernels
    from inferlab.backends.fuse import _block_modules, matvec_linear, swap_children
    from inferlab.backends.int4 import _module as int4_module

    if device.type != "cuda" or not kernels.available():
        raise BackendUnavailable(
            "gemv: triton runs Triton kernels, which need CUDA and the triton package"
        )
    kernels.prepare()
    matvec, int4 = _block_modules()[0], int4_module()

    def swap(m):
        m = matvec_linear(m) if type(m) is torch.nn.Linear else m
        if type(m) in (matvec, int4):
            m.kernel = "triton"
            return m
        return None

    swap_children(model, swap)
    return sum(getattr(m, "kernel", None) == "triton" for m in model.modules())


def bnb_kwargs(precision: str, compute_dtype: str, device: str) -> dict[str, Any]:
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise BackendUnavailable(
            f"bitsandbytes is not installed ({e}): pip install 'inferlab[gpu]'"
        ) from e
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


def torchao_kwargs(precision: str, device: str) -> tuple[dict[str, Any], str]:
    """torchao weight-only: int8 (per channel) or int4 (the tinygemm kernel on CUDA; group size
    128, or the largest of 64 and 32 a layer's row divides: torchao_quantizer), and what torchao
    was asked for."""
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError as e:
        raise BackendUnavailable(f"torchao is not installed ({e}): pip install torchao") from e
    if precision == "int4-ao":
        if device != "cuda":
            raise BackendUnavailable(
                "int4-ao uses torchao's tinygemm int4 kernel, which needs CUDA"
            )
        try:  # torchao >= 0.13 names the tinygemm layout; older ones take version=1
            quant = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        except TypeError:
            quant = Int4WeightOnlyConfig(group_size=128)
    else:
        quant = Int8WeightOnlyConfig()
    detail = f"torchao {type(quant).__name__}: {quant}"[:300]
    return {"quantization_config": TorchAoConfig(quant_type=quant), "dtype": torch.bfloat16,
            "device_map": {"": 0} if device == "cuda" else "cpu"}, detail


def torchao_quantizer(quant):
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
            def fits(m, fqn, g=g):
                return linear(m) and torchao_group_size(m.in_features) == g

            quantize_(block, dataclasses.replace(quant, group_size=g), filter_fn=fits)

    return apply


def quantize_on_device(model, device, apply) -> None:
    """Weight-only quantization of a model loaded on the CPU: each block of its layer lists moves
    to the device and is quantized there (`apply(block, skip_ids)`), then the rest follows, so the
    device never holds more than one block in 16 bits (the peak a quantizing load has). The output
    head stays in 16 bits, as TorchAoConfig keeps it."""
    import torch

    head = model.get_output_embeddings()
    done: set[int] = {id(head)}
    blocks = [b for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for b in lst]
    for block in [*blocks, model]:
        block.to(device)
        apply(block, set(done))
        done.update(id(m) for m in block.modules())
