"""inferlab: a reproducible study of LLM inference optimization."""

__version__ = "0.1.0"


def _load_llama_cpp_first() -> None:
    """Load llama.cpp's shared libraries before numpy's and torch's are loaded into this process.

    On an H100 machine, a CUDA build of llama-cpp-python 0.3.36 crashed (SIGSEGV while loading a model) in every
    process that had imported torch before llama_cpp, and loaded fine in one that had not; the study's workers
    import numpy (and the stages torch) first. Every process of the study imports this package before either,
    so the libraries are loaded here. Without llama-cpp-python nothing happens."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return
    with contextlib.suppress(Exception):  # a broken install is reported where llama.cpp is used, with its message
        import llama_cpp.llama_cpp  # noqa: F401  (loads libllama / libggml through ctypes)


_load_llama_cpp_first()
