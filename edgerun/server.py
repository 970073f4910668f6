"""`edgerun serve`: an OpenAI-compatible HTTP server on the standard library's http.server.

Endpoints (request/response shapes follow the OpenAI API reference for chat completions,
completions and models; streaming uses server-sent events ending with `data: [DONE]`):
  POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health

One generation runs at a time: each request waits its turn in the model's FIFO (Model._turns).
A client that disconnects (while queued, during the prompt, or mid-stream) cancels its
generation: a watcher polls the socket for EOF, so a disconnect is seen even before any output.
No authentication: bind to loopback unless the network is trusted.

Requests come from elsewhere, so each is bounded and checked before it costs anything: the body
size (--max-body, judged by Content-Length before reading), the time to send a request however
slowly its bytes trickle in, the time a client may leave its response unread, the number of open
connections, the prompt's length (a cheap bound before tokenizing, then the exact count), and
every field's type and range (sampling parameters by the function the CLI uses too). Preparing
a prompt (JSON, template, tokenizer) runs one request at a time, so its memory is paid once.
Every error is an OpenAI-style JSON object with a 4xx status (5xx only for the server's own
state), never a dropped connection or a traceback.
"""
from __future__ import annotations

import io
import json
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .errors import EdgerunError
from .memory import fmt, trim_heap
from .sampling import SAMPLING_RANGES, SamplingError, check_sampling

SAMPLING_KEYS = tuple(SAMPLING_RANGES)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # the OpenAI /v1/completions default
DEFAULT_MAX_BODY = 2**20                 # bytes of request body (edgerun serve --max-body)
READ_TIMEOUT = 30.0      # seconds to send a whole request (line, headers, body), and to idle between requests
WRITE_TIMEOUT = 60.0     # seconds a client may leave its response unread before it is dropped
DRAIN_SECONDS = 2.0      # after refusing a body unread: how long to swallow it so the client sees the answer
MAX_CONNECTIONS = 32     # open connections; more are answered 503 at once
MAX_STOPS, MAX_STOP_CHARS = 16, 256
TRIM_AFTER_BYTES = 64 * 2**10    # bodies above this return the heap they took to the OS afterwards
# Peak RSS growth per byte of prompt text while tokenizing it (measured on SmolLM2's tokenizer with
# tools/server_reliability.py: 160 KB of short words, +23 MiB).
TOKENIZE_BYTES_PER_BYTE = 160
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A bad request: answered with `status` (400 unless said) and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class EdgerunHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64         # listen backlog: bursts wait to be accepted instead of being refused

    def __init__(self, model, host: str, port: int, model_id: str | None = None, log=None,
                 max_body: int = DEFAULT_MAX_BODY, read_timeout: float = READ_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        self.model = model
        self.model_id = model_id or model.path.stem
        self.created = int(time.time())
        self.log = log or (lambda msg: None)
        self.max_body, self.read_timeout, self.write_timeout = int(max_body), read_timeout, write_timeout
        self.max_connections = max_connections
        # Longest prompt text that can still fit the context: bounds what is ever tokenized.
        self.max_prompt_bytes = model.context * model.tokenizer.max_token_bytes
        self.records: deque = deque(maxlen=100)   # recent generations (see Generation), newest last
        self.waiting = 0                           # requests queued or running
        self.connections = 0
        self._count_lock = threading.Lock()
        self.prepare_lock = threading.Lock()       # JSON + template + tokenizer: one request at a time
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def request_reserve(self) -> int:
        """What requests may take beyond the model's memory plan: a body being read on every
        connection, and tokenizing the longest prompt that can still fit (one at a time)."""
        return (self.max_connections * self.max_body
                + TOKENIZE_BYTES_PER_BYTE * min(self.max_body, self.max_prompt_bytes))

    def process_request(self, request, client_address):
        """A thread per connection, up to max_connections; beyond, a 503 at once."""
        with self._count_lock:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if not full:
            return super().process_request(request, client_address)
        body = json.dumps(_error_body(f"the server has {self.max_connections} open connections; retry later",
                                      "server_error")).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.connections -= 1

    def handle_error(self, request, client_address):
        # Handler catches what a request can cause; this is only the socket layer's last word
        exc = sys.exc_info()[1]
        self.log(f"{client_address[0]} connection error: {type(exc).__name__}: {exc}")


def make_server(model, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None,
                log=None, max_body: int = DEFAULT_MAX_BODY, **limits) -> EdgerunHTTPServer:
    """A server for a loaded `edgerun.Model`; call serve_forever() (port 0 picks a free port).
    `limits`: read_timeout, write_timeout (seconds), max_connections."""
    try:
        return EdgerunHTTPServer(model, host, port, model_id, log, max_body, **limits)
    except OSError as e:
        raise EdgerunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model, host: str = "127.0.0.1", port: int = 8080, log=print, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve until Ctrl+C (the caller closes the model)."""
    httpd = make_server(model, host, port, log=log, max_body=max_body)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host} without authentication: anyone who can reach it can use the model")
    plan, budget = getattr(model, "plan", None), getattr(model, "budget", None)
    if plan is not None and budget is not None and budget - plan.total < httpd.request_reserve:
        log(f"warning: requests may take up to {fmt(httpd.request_reserve)} beyond the model's memory plan and "
            f"--ram leaves {fmt(max(budget - plan.total, 0))}: raise --ram, or lower --max-body or -c")
    log(f"requests: bodies up to {httpd.max_body / 2**20:.2f} MiB (--max-body), prompt text up to "
        f"{min(httpd.max_body, httpd.max_prompt_bytes) / 2**10:.0f} KiB reaches the tokenizer (longer cannot "
        f"fit -c {model.context}), {httpd.read_timeout:.0f} s to send one")
    log(f"serving {httpd.model_id} on {httpd.url}/v1 (OpenAI-compatible: /v1/chat/completions, "
        f"/v1/completions, /v1/models, /health); Ctrl+C stops")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        log("stopping")
    finally:
        httpd.server_close()


class Generation:
    """One request's run: text pieces with stop strings applied, and what happened."""

    def __init__(self, model, ids, max_tokens, sampling, stops, cancel):
        self.model, self.ids, self.max_tokens = model, ids, max_tokens
        self.sampling, self.stops, self.cancel = sampling, [s for s in stops if s], cancel
        self.finish_reason = None
        self.completion_tokens = 0
        self.queued_at = time.monotonic()
        self.first_token_at = self.last_token_at = None
        self.done = False

    def pieces(self):
        decoder = self.model.tokenizer.stream_decoder()
        pending = ""           # text held back because it may be the start of a stop string
        tokens = self.model.stream_tokens(self.ids, self.max_tokens, self.cancel, **self.sampling)
        try:
            for token in tokens:
                self.last_token_at = time.monotonic()
                self.first_token_at = self.first_token_at or self.last_token_at
                pending += decoder.push(token)
                text, pending, stopped = self._split(pending)
                if text:
                    yield text
                if stopped:
                    self.finish_reason = "stop"
                    return
            pending += decoder.flush()
            text, _, stopped = self._split(pending, final=True)
            if text:
                yield text
        finally:
            tokens.close()        # ends the model's turn now, also when we stop early
            stats = self.model.stats
            self.completion_tokens = stats.generated_tokens
            if self.finish_reason is None:
                self.finish_reason = {"stop": "stop", "length": "length"}.get(stats.finish_reason, "cancelled")

    def _split(self, text, final=False):
        """(text safe to send, text held back, stop string found)."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], "", True
        if final:
            return text, "", False
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold], text[len(text) - hold:], False


class _DeadlineReader(io.RawIOBase):
    """The receiving side of a connection. Every recv waits only until `deadline`, so a request
    must arrive whole within the read timeout however its bytes are paced (slowloris) and whatever
    its Content-Length claims. Between reads the socket keeps the write timeout for responses."""

    def __init__(self, sock, write_timeout: float):
        self.sock, self.write_timeout = sock, write_timeout
        self.deadline = time.monotonic()
        self.received = 0          # bytes since the deadline was last set

    def start(self, seconds: float) -> None:
        self.deadline, self.received = time.monotonic() + seconds, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.write_timeout)
        self.received += n
        return n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive; streams use chunked transfer encoding
    default_request_version = "HTTP/1.0"    # so even an error on a broken request line has a status line
    server: EdgerunHTTPServer

    def setup(self):
        super().setup()
        self.connection.settimeout(self.server.write_timeout)
        self._reader = _DeadlineReader(self.connection, self.server.write_timeout)
        self.rfile = io.BufferedReader(self._reader, 65536)

    def log_message(self, fmt, *args):
        self.server.log(f"{self.address_string()} {fmt % args}")

    def send_response(self, code, message=None):
        self._responded = True
        super().send_response(code, message)

    def handle_one_request(self):
        """http.server's, with a deadline per request, JSON errors and no traceback ever."""
        self._responded = False
        self.command, self.requestline, self.request_version = None, "", self.default_request_version
        self._reader.start(self.server.read_timeout)
        try:
            line = b""
            for _ in range(4):              # RFC 9112: ignore a few empty lines before a request
                line = self.rfile.readline(65537)
                if line.strip() or not line:
                    break
            if not line:
                self.close_connection = True
                return
            self.raw_requestline = line
            if len(line) > 65536:
                self.send_error(414, "the request line is longer than 64 KiB")
                return
            if len(line.split()) != 3:
                self.requestline = line.decode("latin-1").rstrip("\r\n")[:200]
                self.send_error(400, f"bad request line {self.requestline!r}: expected METHOD PATH HTTP/1.1")
                return
            if not self.parse_request():
                return                      # parse_request answered already (through send_error)
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(405)
                return
            method()
            self.wfile.flush()
        except TimeoutError:
            # The request arrived too slowly (or its body was shorter than announced), or the client
            # stopped reading its response. Answer the first if some of the request came.
            if not self._responded and self._reader.received:
                self._error(408, f"the request did not arrive within {self.server.read_timeout:g} s", close=True)
            self.close_connection = True
        except OSError:
            self.close_connection = True    # the client is gone
        except Exception as e:              # a bug of ours: one line in the log, a 500 to the client
            self.server.log(f"{self.address_string()} {self.requestline!r}: internal error "
                            f"{type(e).__name__}: {e}")
            if not self._responded:
                self._error(500, f"internal error: {type(e).__name__}", "server_error", close=True)
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, headers) as JSON like the rest."""
        if code in (405, 501):
            code, message = 405, f"method {self.command} is not allowed here: use GET or POST"
        elif message is None:
            message = self.responses.get(code, ("error",))[0]
        self._error(code, message, close=True)

    def handle_expect_100(self):
        """`Expect: 100-continue`: judge the announced body before inviting it."""
        if self.command == "POST" and self._body_length() is None:
            return False
        return super().handle_expect_100()

    # --- routing ------------------------------------------------------------------------
    def do_GET(self):
        path = urlsplit(self.path).path
        length = self._body_length()
        if length is None:
            return
        self._read_exactly(length)          # a GET with a body: keep the connection in step
        if path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok", "model": self.server.model_id, "requests": self.server.waiting})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.server.model_id}":
            self._json(200, self._model_card())
        else:
            self._error(404, f"no route GET {path}", "not_found_error")

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion}
        path = urlsplit(self.path).path
        length = self._body_length()
        if length is None:
            return                          # answered already
        raw = self._read_exactly(length)
        route = routes.get(path)
        if route is None:
            return self._error(404, f"no route POST {path}", "not_found_error")
        try:
            with self.server.prepare_lock:  # one prompt at a time through JSON, template and tokenizer
                try:
                    job = route(_parse_json(raw))
                finally:
                    if length > TRIM_AFTER_BYTES:
                        trim_heap()         # what tokenizing took, kept by this thread's malloc arena
            self._generate(*job)
        except RequestError as e:
            self._error(e.status, str(e), param=e.param, code=e.code)
        except EdgerunError as e:           # the chat template refused the messages, or the model closed
            closed = self.server.model.closed
            self._error(503 if closed else 400, str(e), "server_error" if closed else "invalid_request_error")

    def _model_card(self):
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "edgerun"}

    # --- endpoints ------------------------------------------------------------------------
    def _chat(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of messages", "messages")
        options = _options(body, body.get("max_completion_tokens", body.get("max_tokens")))
        messages = [_message(i, m) for i, m in enumerate(messages)]
        text = self.server.model.tokenizer.apply_chat_template(messages)
        return self._encode(text, "messages", add_special_tokens=False), options, "chat.completion", "chatcmpl"

    def _completion(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (one prompt per request)", "prompt")
        options = _options(body, body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS))
        return self._encode(prompt, "prompt"), options, "text_completion", "cmpl"

    def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of the prompt, which must leave room for at least one generated token.
        Text longer than the context could hold even in the tokenizer's longest tokens is refused
        before tokenizing (tokenizing costs ~160 bytes of memory per character)."""
        context = self.server.model.context
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.server.max_prompt_bytes:
            raise RequestError(f"the prompt is {size} bytes: more than the {context} tokens of the context "
                               f"can hold", param, code="context_length_exceeded")
        ids = self.server.model.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not ids or len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context holds {context} "
                               f"(one at least is needed for the reply)", param, code="context_length_exceeded")
        return ids

    def _generate(self, ids, options, kind, prefix):
        m = self.server.model
        max_tokens, sampling, stops, stream, include_usage = options
        room = m.context - len(ids)
        cancel = threading.Event()
        run = Generation(m, ids, room if max_tokens is None else min(max_tokens, room), sampling, stops, cancel)
        meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.server.model_id}
        watcher = threading.Thread(target=self._watch_disconnect, args=(cancel, run), daemon=True)
        with self.server._count_lock:
            self.server.waiting += 1
        watcher.start()
        try:
            if stream:
                self._stream(run, kind, meta, include_usage)
            else:
                text = "".join(run.pieces())
                if cancel.is_set():
                    self.close_connection = True
                    return        # the client is gone: nobody to answer
                self._json(200, {**meta, "object": kind, "choices": [_choice(kind, text, run.finish_reason)],
                                 "usage": _usage(run)})
        finally:
            run.done = True
            with self.server._count_lock:
                self.server.waiting -= 1
            self.server.records.append(run)
            self.server.log(f"{meta['id']}: {len(ids)} prompt + {run.completion_tokens} tokens, {run.finish_reason}")

    def _stream(self, run, kind, meta, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        extra = {"usage": None} if include_usage else {}
        chunk = lambda choice: {**meta, "object": kind + ".chunk" if kind == "chat.completion" else kind,  # noqa: E731
                                "choices": [choice], **extra}
        pieces = run.pieces()
        try:
            if kind == "chat.completion":
                self._event(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}))
            for piece in pieces:
                self._event(chunk(_delta(kind, piece, None)))
            self._event(chunk(_delta(kind, "", run.finish_reason)))
            if include_usage:
                self._event({**chunk(None), "choices": [], "usage": _usage(run)})
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
        except OSError:             # the client is gone or stopped reading (write timeout)
            run.cancel.set()
            self.close_connection = True
        except EdgerunError as e:
            self._event({"error": {"message": str(e), "type": "server_error"}})
            self._write_chunk(b"")
        finally:
            pieces.close()          # ends the generation and the model's turn now

    def _watch_disconnect(self, cancel, run):
        """Set `cancel` when the client closes its connection before the response is done."""
        sock = self.connection
        while not run.done and not cancel.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                    cancel.set()
                    return
                if readable:
                    return        # the client sent more (pipelining): we cannot tell; stop watching
            except (OSError, ValueError):
                cancel.set()
                return

    # --- I/O --------------------------------------------------------------------------------
    def _body_length(self) -> int | None:
        """The announced body length, checked before reading any of it; None once an error
        (400, 411, 413) has been answered."""
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (chunked request bodies are not supported)",
                        close=True)
            return None
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            return 0
        if len(values) > 1:
            self._error(400, f"conflicting Content-Length headers: {sorted(values)}", close=True)
            return None
        value = values.pop()
        if not re.fullmatch(r"[0-9]{1,19}", value):
            self._error(400, f"Content-Length must be a byte count, got {value[:40]!r}", close=True)
            return None
        length = int(value)
        if length > self.server.max_body:
            self._error(413, f"the request body is {length} bytes; this server takes at most "
                             f"{self.server.max_body} (edgerun serve --max-body)", close=True)
            self._drain(length)
            return None
        return length

    def _read_exactly(self, length: int) -> bytes:
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:       # EOF before the announced end
            raise OSError("the client closed the connection before sending the whole body")
        return raw

    def _drain(self, length: int) -> None:
        """Swallow (a bounded part of) a refused body, so the client reads our answer instead of a
        reset connection; memory stays one buffer."""
        self._reader.deadline = min(self._reader.deadline, time.monotonic() + DRAIN_SECONDS)
        try:
            while length > 0:
                chunk = self.rfile.read1(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _json(self, status, obj, close: bool = False):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "GET, POST")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, kind=None, param=None, code=None, close=False):
        self.log_error("%d %s", status, message[:200])
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self._json(status, _error_body(message, kind, param, code), close=close)

    def _event(self, obj):
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


# --- request checking ---------------------------------------------------------------------------
def _error_body(message, kind, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as e:         # also UnicodeDecodeError and integers of over 4300 digits
        raise RequestError(f"the request body is not JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _options(body: dict, max_tokens):
    """(max_tokens or None, sampling, stop strings, stream, include_usage), each checked."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("only n=1 is supported", "n")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    sampling = {}
    for key in SAMPLING_KEYS:
        if body.get(key) is not None:
            try:
                sampling[key] = check_sampling(key, body[key])
            except SamplingError as e:
                raise RequestError(str(e), key) from None
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings of at most "
                           f"{MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    return max_tokens, sampling, stops, bool(stream), bool(include_usage)


def _message(i: int, m) -> dict:
    """An OpenAI message (content a string or a list of text parts) -> {role, content}."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestError(f"{where} must be an object with 'role' and 'content'", "messages")
    role = m.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}"[:300], "messages")
    content = m.get("content")
    if content is None and role == "assistant":     # an assistant turn that only called tools
        content = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": "
                                   f"\"...\"}} (images, audio and files are not supported)", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def _choice(kind, text, finish_reason):
    if kind == "chat.completion":
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _delta(kind, text, finish_reason):
    if kind == "chat.completion":
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _usage(run) -> dict:
    p, c = len(run.ids), run.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
