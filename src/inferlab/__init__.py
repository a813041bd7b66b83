"""inferlab: a reproducible study of LLM inference optimization."""

import contextlib
import os

__version__ = "0.1.0"

# Set in the environment of the processes that run llama.cpp (the llama.cpp bench and evaluate workers, the
# convert stage's checks): `import inferlab` then loads llama.cpp's libraries before anything else.
LLAMA_PROCESS_ENV = "INFERLAB_LLAMA_PROCESS"


def load_llama_cpp_first() -> None:
    """Load llama.cpp's shared libraries now, before numpy's and torch's; without llama-cpp-python, nothing.

    A CUDA build of llama-cpp-python 0.3.36 (CUDA 13, H100) crashed in one process with numpy or torch, measured
    in fresh interpreters (docs/decode-loops.md): numpy or torch imported before llama_cpp, a SIGSEGV in the
    model load; torch used after it, `free(): invalid pointer`. llama_cpp imported first, then numpy, works.
    So a process that runs llama.cpp loads it first and never uses torch; every other process leaves it alone."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return
    with contextlib.suppress(Exception):  # a broken install is reported where llama.cpp is used, with its message
        import llama_cpp.llama_cpp  # noqa: F401  (loads libllama / libggml through ctypes)


@contextlib.contextmanager
def llama_children():
    """Processes started inside this block (spawned: they inherit the environment at start) run llama.cpp."""
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
