"""How `edgerun serve` copes with requests from elsewhere: malformed bodies and headers, and one
oversized body next to a normal request.

    python3 tools/server_reliability.py MODEL.ebin [--ram 1GB] [--big-mb 20] [--edgerun DIR]

Starts `python3 -m edgerun serve MODEL --ram RAM --port 0` (from the checkout DIR, default this
one, so an older checkout can be measured the same way), then:

1. sends each request of CASES over a raw socket and counts the ones answered with a 4xx status
   and an OpenAI-style JSON error body ({"error": {...}}); a dropped connection, an HTML page, a
   5xx or no answer within the client timeout counts as not handled;
2. sends one valid chat request whose body is --big-mb MB and, 0.5 s later, a small chat request
   on another connection; reports the big one's status, the small one's latency and the server's
   peak RSS (VmHWM) before and after;
3. says whether the server log shows a traceback.

CASES is also the list tests/test_server.py sends to an in-process server.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hi"}]


def post(body, path: str = CHAT, headers: dict | None = None, length=None) -> bytes:
    """A raw HTTP/1.1 POST; `body` is bytes or a JSON value; `length` overrides Content-Length
    (None: the true length; False: no Content-Length header)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not False:
        lines.append(f"Content-Length: {len(data) if length is None else length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def chat(**fields) -> bytes:
    return post({"messages": HELLO, "max_tokens": 4, **fields})


def raw(text: str) -> bytes:
    return text.encode("latin-1")


# (name, request bytes). Every one must be answered with a 4xx JSON error.
CASES = [
    ("invalid JSON", post(b"{")),
    ("JSON list body", post(b"[]")),
    ("JSON string body", post(b'"x"')),
    ("JSON null body", post(b"null")),
    ("non-UTF-8 body", post(b"\xff\xfe\x00\x81garbage")),
    ("empty body", post(b"")),
    ("messages is a string", post({"messages": "hi"})),
    ("messages empty", post({"messages": []})),
    ("message not an object", post({"messages": [1]})),
    ("message without content", post({"messages": [{"role": "user"}]})),
    ("role hacker", post({"messages": [{"role": "hacker", "content": "hi"}]})),
    ("role not a string", post({"messages": [{"role": 5, "content": "hi"}]})),
    ("content a number", post({"messages": [{"role": "user", "content": 5}]})),
    ("non-string text part", post({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})),
    ("image part", post({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                   "image_url": {"url": "x"}}]}]})),
    ("bare string part", post({"messages": [{"role": "user", "content": ["x"]}]})),
    ("temperature -1", chat(temperature=-1)),
    ("temperature string", chat(temperature="hot")),
    ("temperature inf", post(b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}')),
    ("temperature NaN", post(b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}')),
    ("top_k string", chat(top_k="x")),
    ("top_k 1e12", chat(top_k=1e12)),
    ("top_k -3", chat(top_k=-3)),
    ("top_k 1.5", chat(top_k=1.5)),
    ("top_p 2", chat(top_p=2)),
    ("top_p 0", chat(top_p=0)),
    ("min_p 1.5", chat(min_p=1.5)),
    ("repeat_penalty 0", chat(repeat_penalty=0)),
    ("seed -1", chat(seed=-1)),
    ("seed string", chat(seed="x")),
    ("seed 2**70", chat(seed=2**70)),
    ("max_tokens true", chat(max_tokens=True)),
    ("max_tokens 0", chat(max_tokens=0)),
    ("max_tokens string", chat(max_tokens="10")),
    ("max_tokens inf", post(b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e400}')),
    ("n 2", chat(n=2)),
    ("stream string", chat(stream="yes")),
    ("stream_options string", chat(stream=True, stream_options="x")),
    ("include_usage string", chat(stream=True, stream_options={"include_usage": "x"})),
    ("stop a number", chat(stop=5)),
    ("stop list of numbers", chat(stop=[1, 2])),
    ("stop 100 strings", chat(stop=[f"s{i}" for i in range(100)])),
    ("model a number", chat(model=5)),
    ("nesting 100000 deep", post(b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}")),
    ("integer of 100000 digits", post(b'{"messages": [{"role": "user", "content": "Hi"}], "seed": '
                                      + b"9" * 100000 + b"}")),
    ("prompt longer than the context", post({"messages": [{"role": "user", "content": "fox " * 40000}]})),
    ("completion prompt a number", post({"prompt": 5}, "/v1/completions")),
    ("completion with two prompts", post({"prompt": ["a", "b"]}, "/v1/completions")),
    ("completion without prompt", post({}, "/v1/completions")),
    ("unknown POST route", post({}, "/v1/nothing")),
    ("unknown GET route", raw("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")),
    ("Content-Length abc", post(b"{}", length="abc")),
    ("Content-Length -5", post(b"{}", length=-5)),
    ("Content-Length 10**12", post(b"{}", length=10**12)),
    ("body over the limit", post(b"{}", length=2 * 2**20)),
    ("two Content-Lengths", raw(f"POST {CHAT} HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}")),
    ("chunked body", post(b"2\r\n{}\r\n0\r\n\r\n", length=False, headers={"Transfer-Encoding": "chunked"})),
    ("Expect 100-continue, too big", post(b"", length=10**9, headers={"Expect": "100-continue"})),
    ("body shorter than Content-Length", post(b'{"messages": [', length=400)),
    ("headers never finished", raw(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-")),
    ("PUT", raw(f"PUT {CHAT} HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}")),
    ("DELETE", raw("DELETE /v1/models HTTP/1.1\r\n\r\n")),
    ("PATCH", raw(f"PATCH {CHAT} HTTP/1.1\r\nContent-Length: 0\r\n\r\n")),
    ("OPTIONS", raw("OPTIONS * HTTP/1.1\r\n\r\n")),
    ("garbage request line", raw("GARBAGE\r\n\r\n")),
    ("HTTP/0.9 request", raw("GET /\r\n")),
    ("request line of 70000 bytes", raw("GET /" + "a" * 70000 + " HTTP/1.1\r\n\r\n")),
    ("header line of 70000 bytes", raw("GET /health HTTP/1.1\r\nX-Long: " + "a" * 70000 + "\r\n\r\n")),
    ("200 headers", raw("GET /health HTTP/1.1\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(200)) + "\r\n")),
]


def send(url_or_addr, request: bytes, timeout: float) -> tuple[int | None, bytes]:
    """(status or None, response body) for one raw request on a fresh connection."""
    host, port = url_or_addr
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            try:
                s.sendall(request)
            except OSError:
                pass            # the server may answer and close before reading everything
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and b"content-length:" in head.lower():
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(body) >= n:
                        break
    except OSError as e:
        return None, repr(e).encode()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ")[1]), body
    except (IndexError, ValueError):
        return None, data


def handled(status, body) -> bool:
    """A 4xx status with an OpenAI-style JSON error object."""
    if status is None or not 400 <= status < 500:
        return False
    try:
        return isinstance(json.loads(body).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def run_cases(addr, timeout: float, out=print) -> int:
    ok = 0
    for name, request in CASES:
        status, body = send(addr, request, timeout)
        good = handled(status, body)
        ok += good
        out(f"  {'ok ' if good else 'BAD'} {name}: {status} {body[:100]!r}")
    return ok


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ram", default="1GB")
    ap.add_argument("--big-mb", type=float, default=20.0, help="size of the oversized request (0: skip it)")
    ap.add_argument("--edgerun", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose edgerun package runs the server")
    ap.add_argument("--timeout", type=float, default=40.0, help="client wait per malformed request (s)")
    ap.add_argument("--skip-cases", action="store_true", help="only the memory measurements")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": args.edgerun}
    log_lines: list[str] = []
    proc = subprocess.Popen([sys.executable, "-m", "edgerun", "serve", str(Path(args.model).resolve()), "--ram", args.ram,
                             "--port", "0"], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=args.edgerun)      # `-m` looks in the working directory first
    addr = None
    for line in proc.stderr:
        log_lines.append(line)
        if "serving" in line:
            host, port = line.split(" on ")[1].split()[0].split("//")[1].split("/")[0].split(":")
            addr = (host, int(port))
            break
    if addr is None:
        sys.exit("the server did not start:\n" + "".join(log_lines))
    threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True).start()
    try:
        print(f"server {args.edgerun} pid {proc.pid} on {addr}, --ram {args.ram}")
        if not args.skip_cases:
            print(f"malformed requests ({len(CASES)}):")
            ok = run_cases(addr, args.timeout)
            alive = send(addr, raw("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"), 5)[0] == 200
            print(f"handled with a 4xx JSON error: {ok} of {len(CASES)}; server alive afterwards: {alive}")

        if args.big_mb > 0:
            before = vm_hwm(proc.pid)
            content = "The capital of France is Paris. " * int(args.big_mb * 1e6 / 32)
            big = post({"messages": [{"role": "user", "content": content}], "max_tokens": 4})
            result = {}

            def ask_big():
                t = time.monotonic()
                result["big"] = send(addr, big, 600)[0], time.monotonic() - t

            thread = threading.Thread(target=ask_big)
            thread.start()
            time.sleep(0.5)
            t = time.monotonic()
            small = send(addr, post({"messages": HELLO, "max_tokens": 8, "temperature": 0}), 600)[0]
            small_s = time.monotonic() - t
            thread.join()
            after = vm_hwm(proc.pid)
            print(f"{len(big) / 1e6:.1f} MB body: status {result['big'][0]} in {result['big'][1]:.1f} s; "
                  f"parallel small request: status {small} in {small_s:.2f} s; "
                  f"server peak RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after")

        # Bodies the default limit (1 MiB) admits: prompts of several sizes, then 16 at once
        for kb in (1000, 160, 40):
            content = "The capital of France is Paris. " * int(kb * 1000 / 32)
            status = send(addr, post({"messages": [{"role": "user", "content": content}], "max_tokens": 4}), 600)[0]
            print(f"{kb} KB prompt: status {status}; server peak RSS {vm_hwm(proc.pid) / 2**20:.0f} MiB")
        statuses = []
        body = post({"messages": [{"role": "user", "content": "Paris. " * int(160e3 / 7)}], "max_tokens": 4})
        threads = [threading.Thread(target=lambda: statuses.append(send(addr, body, 600))) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"16 parallel 160 KB prompts: statuses {sorted(statuses, key=str)}; "
              f"server peak RSS {vm_hwm(proc.pid) / 2**20:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    time.sleep(0.2)
    tracebacks = sum("Traceback" in line for line in log_lines)
    print(f"tracebacks in the server log: {tracebacks}")


if __name__ == "__main__":
    main()
