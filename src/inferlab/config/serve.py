"""`inferlab serve` and the serve_bench stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import ConfigError, check_choice, check_folder, check_positive, check_range, check_threads
from inferlab.config.section import Section
from inferlab.config.vocab import PROMPT_LENGTH_DISTRIBUTIONS, SERVE_RUNTIMES, SERVE_SOURCES


@dataclass
class ServeConfig(Section):
    """`inferlab serve`: an OpenAI-compatible server for the recommended configuration (or the one given here)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    # recommendation: metrics/recommendation.json for this hardware; config: below
    source: str = "recommendation"
    recommendation: str = "metrics/recommendation.json"
    # the configuration served when source=config, or when the recommendation has none for this
    # hardware
    runtime: str = "llama_cpp"
    quant: str = "q4_k_m"  # llama.cpp: the GGUF file (models/<model>/gguf/<model>-<quant>.gguf)
    n_threads: int = 0  # llama.cpp and transformers on CPU; 0: every usable core
    # llama.cpp context window; transformers: a static cache's positions (the dynamic cache: the
    # model's max_position_embeddings)
    n_ctx: int = 2048
    precision: str = "fp32"  # transformers
    device: str = "auto"  # transformers: auto (cuda if available), cpu or cuda
    served_model_name: str | None = None  # the name clients ask for; null: model.name
    api_key: str | None = None  # null: $INFERLAB_API_KEY if set, else no key
    # requests waiting beyond this answer 429 with Retry-After (transformers: at least max_batch)
    max_queue: int = 16
    max_batch: int = 8  # transformers: concurrent requests decoded together
    # transformers: how long the first request of a batch waits for company
    batch_wait_ms: float = 5.0
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024
    max_prompt_chars: int = 32768
    max_body_bytes: int = 1_000_000
    # the least Retry-After of a 429 (and its value until the engine's pace is measured)
    retry_after_s: int = 1
    gradio: bool = True  # the demo under /ui
    # let Gradio report usage to api.gradio.app (off: nothing leaves the machine)
    gradio_analytics: bool = False
    # the Host header values (and Origin hosts) answered: loopback by default, so that no other web
    # page can make a browser call this server (DNS rebinding); add this machine's names when
    # serving others, or "*" for any
    allowed_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    # a request's headers and body must arrive within this, else the connection closes
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_choice("serve.source", self.source, SERVE_SOURCES)
        check_choice("serve.runtime", self.runtime, SERVE_RUNTIMES)
        check_choice("serve.device", self.device, ("auto", "cpu", "cuda"))
        check_range("serve.port", self.port, low=0, high=65535)
        for key in ("max_queue", "max_batch", "default_max_tokens", "max_tokens_limit", "max_prompt_chars",
                    "max_body_bytes", "n_ctx"):
            check_range(f"serve.{key}", getattr(self, key), low=1)
        check_threads("serve.n_threads", self.n_threads)
        check_range("serve.keep_alive_s", self.keep_alive_s, low=1)
        check_range("serve.read_timeout_s", self.read_timeout_s, low=0.1)
        if not self.allowed_hosts:
            raise ConfigError("serve.allowed_hosts: empty; give the host names clients use (default: 127.0.0.1, "
                              "localhost, ::1), or ['*'] for any")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"serve.default_max_tokens: {self.default_max_tokens} is above serve.max_tokens_limit "
                              f"({self.max_tokens_limit})")


@dataclass
class ServeSLOConfig(Section):
    """Latency targets a request must meet to count as good (milliseconds; null: not judged)."""

    ttft_ms: float | None = 1000.0  # time to first token
    itl_ms: float | None = 100.0  # the request's mean time per output token after the first (TPOT)
    e2e_ms: float | None = 5000.0  # request to last token

    def __post_init__(self) -> None:
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            if getattr(self, key) is not None:
                check_range(f"serve_bench.slo.{key}", getattr(self, key), low=0.001)


@dataclass
class ServeBenchConfig(Section):
    """Stage `serve_bench`: the server under load, closed loop (N concurrent streaming clients per
    level) and open loop (requests arriving at set rates, whether or not earlier ones finished)."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    requests: int = 16  # per concurrency level (raised to the concurrency if below it)
    prompt_tokens: int = 64  # the typical prompt: every prompt when fixed, the median otherwise
    # fixed, uniform (prompt_tokens·[1±spread]) or lognormal (sigma: spread)
    prompt_tokens_dist: str = "lognormal"
    prompt_tokens_spread: float = 0.5
    # longer draws are cut here (and to what the server's context leaves)
    prompt_tokens_max: int = 512
    max_tokens: int = 32
    # requests before each concurrency level, and the first requests of each rate: not measured
    warmup: int = 2
    # open loop: request rates in requests/s; empty: rate_fractions of the highest request
    # throughput the concurrency sweep measured (so the same config fits any model and machine)
    rates: list[float] = field(default_factory=list)
    rate_fractions: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    rate_requests: int = 24  # measured requests per rate (after the warm-up ones)
    # gamma shape of the gaps between arrivals: 1 Poisson, <1 burstier, >1 more regular
    burstiness: float = 1.0
    slo: ServeSLOConfig = field(default_factory=ServeSLOConfig)
    slo_attainment: float = 0.9  # a rate holds when this share of its requests meets every target
    seed: int = 0  # arrivals and prompt lengths
    prompts: str = "data/prompts"
    timeout_s: float = 900.0  # per level or rate

    def __post_init__(self) -> None:
        if not self.concurrency:
            raise ConfigError("serve_bench.concurrency: empty; give at least one level, e.g. [1, 4]")
        for c in self.concurrency:
            check_range("serve_bench.concurrency", c, low=1)
        for key in ("requests", "prompt_tokens", "max_tokens", "rate_requests", "prompt_tokens_max"):
            check_range(f"serve_bench.{key}", getattr(self, key), low=1)
        check_range("serve_bench.warmup", self.warmup, low=0)
        check_choice("serve_bench.prompt_tokens_dist", self.prompt_tokens_dist, PROMPT_LENGTH_DISTRIBUTIONS)
        check_range("serve_bench.prompt_tokens_spread", self.prompt_tokens_spread, low=0.0,
                    high=1.0 if self.prompt_tokens_dist == "uniform" else None)
        for r in self.rates:
            check_range("serve_bench.rates", r, low=1e-6)
        for f in self.rate_fractions:
            check_range("serve_bench.rate_fractions", f, low=1e-6)
        check_range("serve_bench.burstiness", self.burstiness, low=1e-3)
        check_range("serve_bench.slo_attainment", self.slo_attainment, low=0.0, high=1.0)
        if self.prompt_tokens > self.prompt_tokens_max:
            raise ConfigError(f"serve_bench.prompt_tokens: {self.prompt_tokens} is above serve_bench."
                              f"prompt_tokens_max ({self.prompt_tokens_max})")
        check_positive("serve_bench.timeout_s", self.timeout_s)
        check_folder("serve_bench.prompts", self.prompts)
