"""`inferlab serve`: serve the configuration the study recommends for this machine, or the
one Hydra overrides give, with uvicorn on 127.0.0.1 unless told otherwise.

    inferlab serve model=tiny-phi    # metrics/recommendation.json, else serve.* below
    inferlab serve serve.source=config serve.runtime=hf serve.precision=fp32 serve.port=8001
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from inferlab.config import ConfigError, StudyConfig, resolve
from inferlab.environment import environment

log = logging.getLogger(__name__)


def choose(cfg: StudyConfig, hardware_id: str | None = None) -> tuple[dict[str, Any], str]:
    """The settings to serve and where they came from."""
    s = cfg.serve
    fallback = {"runtime": s.runtime, "quant": s.quant, "n_threads": s.n_threads,
                "precision": s.precision, "device": s.device}
    if s.source == "config":
        return fallback, "serve.* in the configuration (serve.source=config)"
    path = resolve(s.recommendation)
    if not path.is_file():
        return fallback, (f"serve.* in the configuration: {path} does not exist "
                          "(run the report stage)")
    hardware_id = hardware_id or environment()["hardware"]["id"]
    doc = json.loads(path.read_text())
    for r in doc.get("recommendations", []):
        if r.get("hardware") == hardware_id and r.get("model") == cfg.model.name:
            if r.get("status") != "recommended":
                return fallback, ("serve.* in the configuration: the report recommends nothing "
                                  f"for {cfg.model.name} on {hardware_id} "
                                  f"({r.get('reason', '')[:200]})")
            return dict(r["settings"]), f"{path.name}: {r['name']} ({r['reason'][:200]})"
    return fallback, (f"serve.* in the configuration: {path.name} has no entry for "
                      f"{cfg.model.name} on {hardware_id}")


def build_engine(cfg: StudyConfig, settings: dict[str, Any]):
    from inferlab.config import usable_cores
    from inferlab.serve.engine import LlamaCppEngine
    from inferlab.serve.hf_engine import HFEngine

    s = cfg.serve
    threads = int(settings.get("n_threads") or 0) or usable_cores()
    if settings["runtime"] == "llama_cpp":
        from inferlab import load_llama_cpp_first

        # before the engine's imports load numpy (a CUDA build crashes after it)
        load_llama_cpp_first()
        quant = settings.get("quant") or s.quant
        path = cfg.gguf_path(quant)
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in path.parent.glob("*.gguf"))) or "none"
            raise ConfigError(f"serve.quant: {path} does not exist; run the convert stage with "
                              f"{quant} (available: {available})")
        return LlamaCppEngine(str(path), threads, s.n_ctx, s.max_queue,
                              n_batch=int(settings.get("n_batch") or 512),
                              flash_attn=bool(settings.get("flash_attn", False)),
                              kv_type=settings.get("kv_type") or "f16",
                              n_gpu_layers=int(settings.get("n_gpu_layers") or 0))  # as measured
    model_dir = cfg.model_dir() / "hf"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} has no model; run the download stage for "
                          f"{cfg.model.name}")
    max_batch = int(settings.get("batch_size") or 0) or s.max_batch
    precision = settings.get("precision") or s.precision
    device = settings.get("device") or s.device
    return HFEngine(str(model_dir), precision, device, s.max_queue, max_batch, s.batch_wait_ms,
                    n_threads=threads, point=settings, n_ctx=s.n_ctx)


def make_app(cfg: StudyConfig, hardware_id: str | None = None):
    """The ASGI app with its engine started (and the Gradio demo under /ui when enabled)."""
    settings, source = choose(cfg, hardware_id)
    log.info("serving %s with %s; from %s", cfg.model.name, settings, source)
    if cfg.serve.gradio:
        from inferlab.serve.demo import quiet_gradio

        # before anything imports gradio or huggingface_hub
        quiet_gradio(cfg.serve.gradio_analytics)
    engine = build_engine(cfg, settings)
    engine.start()
    from inferlab.serve.app import create_app

    name = cfg.serve.served_model_name or cfg.model.name
    api_key = cfg.serve.api_key or os.environ.get("INFERLAB_API_KEY") or None
    app = create_app(engine, name, cfg.serve, api_key)
    app.state.source = source
    if cfg.serve.gradio:
        import gradio as gr

        from inferlab.serve.demo import build_demo, engine_stream

        demo = build_demo(engine_stream(engine, cfg.serve), name)
        app = gr.mount_gradio_app(app, demo, path="/ui")
    return app


def timed_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol with a read timeout for a request's headers and body.

    They must arrive within read_timeout_s of the first byte (or of the connection's opening), else
    the connection is closed. uvicorn's timeout_keep_alive covers only the idle time between
    requests: a client sending nothing, or half a request, would hold its connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            # the next request begins
            if self.read_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in (or the connection is done)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.read_timer = self.loop.call_later(read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _too_slow(self) -> None:
            self.read_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete request within %.0f s "
                         "(serve.read_timeout_s)", read_timeout_s)
                self.transport.close()

    return ReadTimeoutH11Protocol


def serve(cfg: StudyConfig) -> None:
    import uvicorn

    s = cfg.serve
    app = make_app(cfg)
    host, port = s.host, s.port
    if host not in ("127.0.0.1", "localhost", "::1"):
        key = s.api_key or os.environ.get("INFERLAB_API_KEY")
        log.warning("listening on %s: reachable from other machines%s", host,
                    "" if key else " and without an API key (set serve.api_key or "
                                   "INFERLAB_API_KEY)")
        if "*" not in s.allowed_hosts and host not in s.allowed_hosts:
            log.warning("serve.allowed_hosts is %s: requests naming this machine by another "
                        "name or address are refused (400 invalid_host); add them, or '*'",
                        list(s.allowed_hosts))
    log.info("OpenAI-compatible API on http://%s:%d/v1 (docs /docs, demo /ui, metrics /metrics)",
             host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                timeout_keep_alive=s.keep_alive_s, http=timed_protocol(s.read_timeout_s))


def main(argv: list[str] | None = None) -> int:
    from inferlab.config import compose
    from inferlab.logs import setup_logging

    setup_logging()
    argv = list(argv or [])
    try:
        if argv[:1] == ["--params"]:  # a resolved config written by serve_bench
            import yaml

            from inferlab.config import load

            cfg = load(yaml.safe_load(Path(argv[1]).read_text()))
        else:
            cfg = compose(argv)
    except ConfigError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    try:
        serve(cfg)
    except ConfigError as e:
        raise SystemExit(f"cannot serve: {e}") from None
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
