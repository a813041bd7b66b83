"""The Gradio demo: a prompt, a streamed answer, and the answer's TTFT and tokens/s.

Mounted under /ui by `inferlab serve` (talking to the engine in-process), or run alone against
any running server (talking to its REST API):

    inferlab demo --url http://127.0.0.1:8000 [--api-key KEY]
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

# a stream function yields ("text", piece) and finally ("done", {"completion_tokens": n, ...})
StreamFn = Callable[[str, int, float], Iterator[tuple[str, Any]]]


def quiet_gradio(analytics: bool) -> None:
    """Gradio reports usage to api.gradio.app (and the Hub client to huggingface.co) unless told
    not to; the study tells it not to unless serve.gradio_analytics is true. Set before gradio
    is imported: it reads them then."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "True" if analytics else "False"
    if not analytics:
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        # the server loads local files only: nothing from the Hub
        os.environ["HF_HUB_OFFLINE"] = "1"


def engine_stream(engine, settings) -> StreamFn:
    """The demo in-process: the REST API's checks and limits (settings: the ServeConfig)."""
    from inferlab.serve.engine import QueueFull
    from inferlab.serve.protocol import APIError, prepare

    def stream(prompt: str, max_tokens: int, temperature: float) -> Iterator[tuple[str, Any]]:
        events: queue.Queue = queue.Queue()
        try:
            req = prepare(engine, settings, prompt, int(max_tokens),
                          temperature=float(temperature))
            req.emit = lambda kind, value: events.put((kind, value))
            engine.submit(req)
        except APIError as e:
            yield "error", e.message
            return
        except QueueFull:
            yield "error", f"the server is busy ({engine.depth} requests waiting); retry later"
            return
        try:
            while True:
                kind, value = events.get(timeout=600)
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            req.cancelled.set()

    return stream


def http_stream(url: str, model: str, api_key: str | None = None) -> StreamFn:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def stream(prompt: str, max_tokens: int, temperature: float) -> Iterator[tuple[str, Any]]:
        body = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens),
                "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url.rstrip('/')}/v1/completions", json=body, headers=headers,
                          timeout=600) as r:
            if r.status_code != 200:
                error = json.loads(r.read()).get("error", {})
                yield "error", error.get("message", f"HTTP {r.status_code}")
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    yield "done", chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("finish_reason") is None:
                        yield "text", c.get("text", "")
                    elif c.get("text"):
                        yield "text", c["text"]

    return stream


def build_demo(stream: StreamFn, model_name: str):
    import gradio as gr

    def generate(prompt: str, max_tokens: float, temperature: float):
        t0, first, text, n = time.perf_counter(), None, "", 0
        for kind, value in stream(prompt, int(max_tokens), float(temperature)):
            if kind == "error":
                yield text, f"error: {value}"
                return
            if kind == "text":
                first = first or time.perf_counter()
                text += value
                yield text, _stats(t0, first, None)
            elif kind == "done":
                n = value.get("completion_tokens", 0)
                text += value.get("tail", "")
        yield text, _stats(t0, first, n)

    with gr.Blocks(title=f"inferlab: {model_name}") as demo:
        gr.Markdown(f"## {model_name}\nThe configuration the study recommends, served by "
                    "inferlab.")
        prompt = gr.Textbox(label="Prompt", lines=4,
                            value="Instruct: Explain what a KV cache is.\nOutput:")
        with gr.Row():
            max_tokens = gr.Slider(1, 512, value=64, step=1, label="max tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                    label="temperature (0: greedy)")
        button = gr.Button("Generate", variant="primary")
        answer = gr.Textbox(label="Answer", lines=8)
        stats = gr.Markdown()
        button.click(generate, [prompt, max_tokens, temperature], [answer, stats],
                     api_name="generate")
    return demo


def _stats(t0: float, first: float | None, n: int | None) -> str:
    now = time.perf_counter()
    if first is None:
        return "no tokens"
    ttft = (first - t0) * 1000
    if n is None:
        return f"TTFT {ttft:.0f} ms · generating…"
    rate = (n - 1) / (now - first) if n > 1 and now > first else 0.0
    return f"TTFT {ttft:.0f} ms · {n} tokens · {rate:.1f} tokens/s after the first"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="inferlab demo",
                                description="the Gradio demo against a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--analytics", action="store_true",
                   help="let Gradio report usage to api.gradio.app")
    args = p.parse_args(argv)
    quiet_gradio(args.analytics)
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(f"{args.url.rstrip('/')}/v1/models", headers=headers, timeout=10).json()
    model = models["data"][0]["id"]
    build_demo(http_stream(args.url, model, args.api_key), model).launch(server_name="127.0.0.1",
                                                                         server_port=args.port)
    return 0
