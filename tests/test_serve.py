"""The server for real: `inferlab serve` in a child process on 127.0.0.1 with tiny-phi on llama.cpp and on
transformers, called over HTTP (httpx, the openai client, gradio_client)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from inferlab.serve.engine import TextAssembler
from inferlab.serve.loadtest import free_port

KEY = "test-secret"


def start_server(project, *overrides: str, timeout: float = 240):
    port = free_port()
    env = {**os.environ, "INFERLAB_ROOT": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "inferlab.serve.server", "model=tiny-phi", f"serve.port={port}",
                             "tracking.enabled=false", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not start")


def stop(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def llama_server(tiny_project):
    """llama.cpp, an API key, a queue of one, a 1024-token context, the Gradio demo under /ui."""
    proc, url = start_server(tiny_project, "serve.source=config", "serve.runtime=llama_cpp", "serve.quant=q8_0",
                             f"serve.api_key={KEY}", "serve.max_queue=1", "serve.n_ctx=1024",
                             "serve.max_tokens_limit=1000")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def hf_server(tiny_project):
    proc, url = start_server(tiny_project, "serve.source=config", "serve.runtime=hf", "serve.precision=fp32",
                             "serve.device=cpu", "serve.batch_wait_ms=300", "serve.max_batch=4", "serve.gradio=false")
    yield url
    stop(proc)


H = {"Authorization": f"Bearer {KEY}"}


def post(url, path, body, headers=H, **kw):
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kw)


def sse(url, path, body, headers=H) -> tuple[list[dict], list[str]]:
    chunks, raw = [], []
    with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                raw.append(line)
                if line != "data: [DONE]":
                    chunks.append(json.loads(line[len("data: "):]))
    return chunks, raw


def metric(url, name, headers=H) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_text_assembler_holds_back_stop_prefixes_and_partial_characters():
    pieces = ["Hel", "lo", " wor", "ld", "\n", "Us", "er: more"]
    a = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop=["\nUser:"])
    out = [a.add(i) for i in range(len(pieces))]
    assert "".join(out) == "Hello world" and a.stopped
    assert out[4] == "" and out[5] == ""  # "\n" and "\nUs" might start the stop string: held back
    b = TextAssembler(lambda ids: "caf\ufffd" if len(ids) == 1 else "café", stop=[])  # é split over two tokens
    assert b.add(0) == "caf" and b.add(1) == "é"


@pytest.mark.slow
def test_llama_cpp_completions_chat_streaming_and_openai_client(llama_server):
    url = llama_server
    models = httpx.get(f"{url}/v1/models", headers=H).json()
    assert models["data"][0]["id"] == "tiny-phi" and models["data"][0]["inferlab"]["runtime"] == "llama_cpp"
    body = {"model": "tiny-phi", "prompt": "The weather today is", "max_tokens": 12, "temperature": 0}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["prompt_tokens"] > 0 and 0 < out["usage"]["completion_tokens"] <= 12
    chunks, raw = sse(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert raw[-1] == "data: [DONE]"
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == out["choices"][0]["text"]  # greedy: the same text streamed or not
    assert chunks[-1]["usage"] == out["usage"]

    chat = {"model": "tiny-phi", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0}
    r = post(url, "/v1/chat/completions", chat)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    chunks, raw = sse(url, "/v1/chat/completions", {**chat, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"} and raw[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        r.json()["choices"][0]["message"]["content"]

    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert client.completions.create(model="tiny-phi", prompt="The weather today is", max_tokens=12,
                                     temperature=0).choices[0].text == out["choices"][0]["text"]
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-phi", messages=chat["messages"], max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == r.json()["choices"][0]["message"]["content"]
    with pytest.raises(Exception, match="model_not_found|does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert httpx.get(f"{url}/openapi.json", headers=H).json()["paths"]["/v1/completions"]["post"]["requestBody"]


@pytest.mark.slow
def test_sampling_seed_stop_and_max_tokens(llama_server):
    url = llama_server
    body = {"model": "tiny-phi", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0, "top_p": 0.9,
            "seed": 7}
    a, b = (post(url, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    assert a == b  # the same seed, the same sample
    greedy = post(url, "/v1/completions", {**body, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    assert greedy["usage"]["completion_tokens"] == 30 or greedy["choices"][0]["finish_reason"] == "stop"
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = post(url, "/v1/completions", {**body, "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]


@pytest.mark.slow
def test_bad_input_gets_a_clear_4xx_and_nothing_breaks(llama_server):
    url = llama_server
    ok = {"model": "tiny-phi", "prompt": "Hi", "max_tokens": 4}

    def err(r, status, code=None, param=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert e["message"] and (code is None or e["code"] == code) and (param is None or e["param"] == param)

    raw = {**H, "content-type": "application/json"}
    err(httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny-phi", "prompt": ', headers=raw), 400,
        "invalid_json")
    err(httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny-phi", "prompt": "\xff\xfe"}', headers=raw),
        400, "invalid_encoding")
    err(post(url, "/v1/completions", {"model": "tiny-phi"}), 400, "invalid_value", "prompt")
    err(post(url, "/v1/chat/completions", {"model": "tiny-phi", "messages": []}), 400, "invalid_value", "messages")
    err(post(url, "/v1/chat/completions", {"model": "tiny-phi", "messages": [{"role": "wizard", "content": "x"}]}),
        400, "invalid_value")
    err(post(url, "/v1/completions", {**ok, "max_tokens": 0}), 400, "invalid_value", "max_tokens")
    err(post(url, "/v1/completions", {**ok, "max_tokens": 1001}), 400, "invalid_value", "max_tokens")
    err(post(url, "/v1/completions", {**ok, "temperature": 2.5}), 400, "invalid_value", "temperature")
    err(post(url, "/v1/completions", {**ok, "top_p": 0}), 400, "invalid_value", "top_p")
    err(post(url, "/v1/completions", {**ok, "model": "phi-3"}), 404, "model_not_found", "model")
    err(post(url, "/v1/completions", {**ok, "prompt": "word " * 1100}), 400, "context_length_exceeded", "prompt")
    err(post(url, "/v1/completions", {**ok, "prompt": "x" * 40000}), 400, "prompt_too_long")
    err(post(url, "/v1/completions", {**ok, "prompt": "x" * 1_100_000}), 413, "body_too_large")
    err(post(url, "/v1/completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "invalid_value", "stop")
    # the API key: everything but /health needs it
    assert httpx.get(f"{url}/health").status_code == 200
    err(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
    err(post(url, "/v1/completions", ok, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    err(httpx.get(f"{url}/metrics"), 401, "invalid_api_key")
    assert post(url, "/v1/completions", ok).status_code == 200  # and the server still serves
    assert metric(url, 'inferlab_errors_total{type="invalid_json"}') >= 1
    assert metric(url, 'inferlab_errors_total{type="context_length_exceeded"}') >= 1
    assert metric(url, 'inferlab_requests_total{endpoint="/v1/completions",status="400"}') >= 10


@pytest.mark.slow
def test_disconnect_mid_stream_stops_generation_and_full_queue_answers_429(llama_server):
    url = llama_server
    long = {"model": "tiny-phi", "prompt": "Tell a story:", "max_tokens": 1000, "temperature": 0, "stream": True}
    before = metric(url, "inferlab_generated_tokens_total")
    cancelled = metric(url, 'inferlab_errors_total{type="client_disconnected"}')
    with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=H, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and metric(url, 'inferlab_errors_total{type="client_disconnected"}') == cancelled:
        time.sleep(0.2)
    assert metric(url, 'inferlab_errors_total{type="client_disconnected"}') > cancelled
    while time.time() < deadline and httpx.get(f"{url}/health").json()["in_flight"]:
        time.sleep(0.1)
    generated = metric(url, "inferlab_generated_tokens_total") - before
    assert 0 < generated < 1000, generated  # stopped early, not run to max_tokens

    # queue of one: one request generating, one waiting, the others are turned away at once
    results: dict[int, httpx.Response] = {}

    def call(i):
        results[i] = post(url, "/v1/completions", {**long, "stream": False})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    busy = next(r for r in results.values() if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert metric(url, 'inferlab_errors_total{type="queue_full"}') >= 1
    text = httpx.get(f"{url}/metrics", headers=H).text
    for name in ("inferlab_ttft_seconds_bucket", "inferlab_itl_seconds_count", "inferlab_queue_depth",
                 "inferlab_requests_in_flight", "inferlab_generated_tokens_total"):
        assert name in text


@pytest.mark.slow
def test_gradio_demo_answers_through_gradio_client(llama_server):
    from gradio_client import Client

    client = Client(f"{llama_server}/ui/", headers=H, verbose=False)
    answer, stats = client.predict("The weather today is", 12, 0.0, api_name="/generate")
    expected = post(llama_server, "/v1/completions", {"model": "tiny-phi", "prompt": "The weather today is",
                                                      "max_tokens": 12, "temperature": 0}).json()
    assert answer == expected["choices"][0]["text"]
    assert re.search(r"TTFT \d+ ms · \d+ tokens · [\d.]+ tokens/s", stats), stats


@pytest.mark.slow
def test_transformers_backend_batches_concurrent_requests(hf_server):
    url = hf_server
    body = {"model": "tiny-phi", "prompt": "The weather today is", "max_tokens": 10, "temperature": 0}
    alone = post(url, "/v1/completions", body, headers={}).json()["choices"][0]["text"]
    chunks, raw = sse(url, "/v1/completions", {**body, "stream": True}, headers={})
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone and raw[-1] == "data: [DONE]"
    prompts = ["The weather today is", "A short story:", "def add(a, b):", "The capital of France"]
    out: dict[int, str] = {}

    def call(i):
        out[i] = post(url, "/v1/completions", {**body, "prompt": prompts[i]}, headers={}).json()["choices"][0]["text"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == alone  # left padding in a batch does not change a greedy answer
    sizes = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'inferlab_engine_batches_total\{size="(\d+)"\} (\S+)', httpx.get(f"{url}/metrics").text)}
    assert max(sizes) >= 2, sizes  # concurrent requests were decoded together
    chat = post(url, "/v1/chat/completions", {"model": "tiny-phi", "max_tokens": 5,
                                               "messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 5
