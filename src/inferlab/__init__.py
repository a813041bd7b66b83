"""inferlab: a reproducible study of LLM inference optimization."""

__version__ = "0.1.0"
