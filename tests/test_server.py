"""`edgerun serve` driven by the official `openai` client over loopback: answers equal the
library's own greedy output (streamed and not), requests queue without interleaving, and a
client that disconnects cancels its generation (mid-stream and mid-prompt, on the real model)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import edgerun
from edgerun.convert.pack import pack
from edgerun.server import make_server

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Once upon a time"}]


def start(model):
    httpd = make_server(model, "127.0.0.1", 0)          # loopback only, a free port
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=httpd.url + "/v1", api_key="unused", max_retries=0)
    return httpd, client


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny.ebin"
    pack(tiny_dir("llama"), out, dtype="f32")
    m = edgerun.load(out)
    httpd, client = start(m)
    yield m, httpd, client
    httpd.shutdown()
    httpd.server_close()
    m.close()


def test_models_and_health(tiny):
    m, httpd, client = tiny
    assert [x.id for x in client.models.list().data] == ["tiny"]
    health = json.load(urllib.request.urlopen(httpd.url + "/health"))
    assert health["status"] == "ok"


def test_chat_equals_library_streamed_and_not(tiny):
    m, httpd, client = tiny
    expected = m.chat(CHAT, max_tokens=40, temperature=0)
    expected_tokens = m.stats.generated_tokens
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == expected_tokens
    assert r.usage.prompt_tokens == len(m.tokenizer.encode_chat(CHAT))
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == expected_tokens


def test_completions_and_stop_strings(tiny):
    m, httpd, client = tiny
    prompt = "The quick brown fox"
    expected = m.generate(prompt, max_tokens=30, temperature=0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert streamed == expected
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]
    assert stop.strip(), expected
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                        stop=[stop], stream=stream)
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == expected[:expected.find(stop)]


def test_bad_requests_are_400(tiny):
    m, httpd, client = tiny
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="fox " * 2000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="fox", max_tokens=0)


def test_two_concurrent_requests_queue(tiny):
    """Both answers equal the sequential ones (an interleaved KV cache would change them) and
    one request's tokens all come before the other's."""
    m, httpd, client = tiny
    prompts = ["Once upon a time", "def main():"]
    expected = [m.generate(p, max_tokens=200, temperature=0) for p in prompts]
    results = [None, None]

    def ask(i):
        results[i] = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=200, temperature=0, stream=True))

    httpd.records.clear()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == expected
    a, b = sorted(httpd.records, key=lambda r: r.first_token_at)
    assert a.completion_tokens > 20 and b.completion_tokens > 20
    assert a.last_token_at < b.first_token_at


@pytest.mark.slow
def test_disconnect_cancels_on_real_model(smollm2_ebin):
    with edgerun.load(smollm2_ebin, ram="2GB") as m:
        httpd, client = start(m)
        try:
            # mid-stream: read a few pieces, then drop the connection
            stream = client.chat.completions.create(model="x", messages=CHAT, max_tokens=400, stream=True,
                                                    temperature=0)
            for i, _ in zip(range(4), stream):
                pass
            stream.close()
            waited = _wait_record(httpd, 1)
            run = httpd.records[-1]
            assert run.finish_reason == "cancelled" and run.completion_tokens < 50, vars(run)
            assert waited < 1.0
            # mid-prompt: a long prompt and a client that gives up after 0.3 s
            long = [{"role": "user", "content": "The history of Paris, the capital of France. " * 120}]
            start_time = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=0.3).chat.completions.create(model="x", messages=long, max_tokens=50)
            _wait_record(httpd, 2)
            run = httpd.records[-1]
            assert run.finish_reason == "cancelled" and run.completion_tokens == 0
            assert time.monotonic() - start_time < 1.5       # the full prefill takes ~4 s
            # the model is free again
            r = client.chat.completions.create(model="x", messages=CHAT, max_tokens=5)
            assert r.usage.completion_tokens >= 1
        finally:
            httpd.shutdown()
            httpd.server_close()


def _wait_record(httpd, n, timeout=5.0) -> float:
    start = time.monotonic()
    while len(httpd.records) < n:
        assert time.monotonic() - start < timeout, "the server did not finish the request"
        time.sleep(0.01)
    return time.monotonic() - start


def test_serve_command(tiny):
    """The CLI entry point: `edgerun serve MODEL --port 0` prints its address and answers."""
    m = tiny[0]
    proc = subprocess.Popen([sys.executable, "-m", "edgerun", "serve", str(m.path), "--ram", "1GB",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if "serving" in line:
                url = line.split(" on ")[1].split()[0]
                break
        assert url, "no 'serving' line"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == m.chat(CHAT, max_tokens=8, temperature=0)
    finally:
        proc.terminate()
        proc.wait(10)
