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
    """The CLI entry point: `edgerun serve MODEL --port 0` prints its address and answers;
    --max-body sets the body limit."""
    m = tiny[0]
    proc = subprocess.Popen([sys.executable, "-m", "edgerun", "serve", str(m.path), "--ram", "1GB",
                             "--port", "0", "--max-body", "4KiB"], stderr=subprocess.PIPE, text=True)
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
        with pytest.raises(openai.APIStatusError, match="at most 4096") as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
        assert e.value.status_code == 413
    finally:
        proc.terminate()
        proc.wait(10)


# --- requests from elsewhere ------------------------------------------------------------------------
def _reliability_tool():
    """tools/server_reliability.py: its CASES (malformed requests) and raw-socket helpers."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "server_reliability.py"
    spec = importlib.util.spec_from_file_location("server_reliability", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _reliability_tool()


@pytest.fixture(scope="module")
def strict(tiny):
    """The tiny model behind a second server with short timeouts and a log we can read."""
    m = tiny[0]
    log = []
    httpd = make_server(m, "127.0.0.1", 0, log=log.append, read_timeout=1.0, write_timeout=2.0, max_connections=4)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, httpd.server_address[:2], log
    httpd.shutdown()
    httpd.server_close()


def test_malformed_requests_get_4xx_json(strict):
    """Every request of tools/server_reliability.py's CASES (bad JSON, types, ranges, headers,
    lengths, methods, request lines, slow or short bodies) is answered with a 4xx status and an
    OpenAI-style JSON error, and the server keeps serving."""
    httpd, addr, log = strict
    assert len(tool.CASES) >= 40
    bad = []
    for name, request in tool.CASES:
        status, body = tool.send(addr, request, timeout=10)
        if not tool.handled(status, body):
            bad.append((name, status, body[:200]))
    assert not bad
    status, body = tool.send(addr, tool.raw("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"), 5)
    assert status == 200
    assert not [line for line in log if "internal error" in line or "Traceback" in line]


def test_error_shapes_and_status(strict):
    httpd, addr, log = strict
    status, body = tool.send(addr, tool.chat(top_k="x"), 5)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "top_k" and "[0, 2147483647]" in error["message"]
    assert error["type"] == "invalid_request_error"
    status, body = tool.send(addr, tool.raw("PUT /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), 5)
    assert status == 405
    status, body = tool.send(addr, tool.post(b"{}", length=10**12), 5)
    assert status == 413 and "--max-body" in json.loads(body)["error"]["message"]
    status, body = tool.send(addr, tool.post({"messages": [{"role": "user", "content": "fox " * 100000}]}), 10)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and "bytes" in error["message"]


def test_oversized_body_is_refused_unread(strict):
    """The 413 comes as soon as the headers announce too much: the body is never buffered."""
    import socket
    httpd, addr, log = strict
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(tool.post(b"{}", length=20 * 10**6)[:-2] + b"{" * 1000)   # 20 MB announced, 1 KB sent
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413")


def test_max_tokens_is_clamped_to_the_context(tiny):
    m, httpd, client = tiny
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10**9, temperature=0,
                                  stop=None)
    assert r.usage.completion_tokens <= m.context - r.usage.prompt_tokens


def test_slow_client_is_cut_off_and_others_are_served(strict):
    """Slowloris: a byte every 0.2 s never completes a request within the 1 s read timeout
    (however steadily it trickles); it gets a 408 while another client is answered normally."""
    import select
    import socket
    import time
    httpd, addr, log = strict
    health = tool.raw("GET /health HTTP/1.1\r\n\r\n")
    with socket.create_connection(addr, timeout=5) as slow:
        start = time.monotonic()
        for i, byte in enumerate(tool.chat()[:25]):     # 25 bytes in 5 s, if it were let
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break                                   # answered and closed
            if i == 2:
                assert tool.send(addr, health, 5)[0] == 200
            if select.select([slow], [], [], 0.2)[0]:
                break                                   # the answer is there
        answer = b""
        while True:
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in answer, answer[:300]
    assert time.monotonic() - start < 3


def test_connections_over_the_limit_get_503(strict):
    import socket
    httpd, addr, log = strict
    idle = [socket.create_connection(addr, timeout=5) for _ in range(httpd.max_connections)]
    try:
        import time
        deadline = time.monotonic() + 5
        while httpd.connections < httpd.max_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = tool.send(addr, tool.raw("GET /health HTTP/1.1\r\n\r\n"), 5)
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
    finally:
        for s in idle:
            s.close()
