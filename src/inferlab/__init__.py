"""inferlab: a reproducible study of LLM inference optimization."""

import contextlib
import os

__version__ = "0.1.0"

# Set in the environment of the processes that run llama.cpp (the llama.cpp bench and evaluate
# workers, the convert stage's checks): `import inferlab` then loads llama.cpp's libraries
# before anything else.
LLAMA_PROCESS_ENV = "INFERLAB_LLAMA_PROCESS"

# Nothing here needs NVLink multicast (NCCL's NVLS, PyTorch's symmetric memory, NVSHMEM), and on
# a shared multi-GPU host a program that uses it can put every GPU of the host out of service.
# Every process that imports inferlab keeps it off, whatever environment it was started with (a
# worker, a submitit job, a subprocess with its own env).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)


def load_llama_cpp_first() -> None:
    """Load llama.cpp's shared libraries now, before numpy's and torch's (if it is installed).

    A CUDA build of llama-cpp-python 0.3.36 (CUDA 13, H100) crashed in one process with numpy or
    torch, measured in fresh interpreters (docs/decode-loops.md): numpy or torch imported before
    llama_cpp, a SIGSEGV in the model load; torch used after it, `free(): invalid pointer`.
    llama_cpp imported first, then numpy, works. So a process that runs llama.cpp loads it first
    and never uses torch; every other process leaves it alone."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return
    # a broken install is reported where llama.cpp is used, with its message
    with contextlib.suppress(Exception):
        import llama_cpp.llama_cpp  # noqa: F401  (loads libllama / libggml through ctypes)


@contextlib.contextmanager
def llama_children():
    """Processes started in this block run llama.cpp (spawned: they inherit the environment)."""
    old = os.environ.get(LLAMA_PROCESS_ENV)
    os.environ[LLAMA_PROCESS_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LLAMA_PROCESS_ENV, None)
        else:
            os.environ[LLAMA_PROCESS_ENV] = old


if os.environ.get(LLAMA_PROCESS_ENV) == "1":
    load_llama_cpp_first()
