"""`edgerun serve`: an OpenAI-compatible HTTP server on the standard library's http.server.

Endpoints (request/response shapes follow the OpenAI API reference for chat completions,
completions and models; streaming uses server-sent events ending with `data: [DONE]`):
  POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health

One generation runs at a time: each request waits its turn in the model's FIFO (Model._turns).
A client that disconnects (while queued, during the prompt, or mid-stream) cancels its
generation: a watcher polls the socket for EOF, so a disconnect is seen even before any output.
No authentication: bind to loopback unless the network is trusted.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import EdgerunError

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # the OpenAI /v1/completions default


class RequestError(Exception):
    """A bad request: answered with HTTP 400 and an OpenAI-style error body."""


class EdgerunHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, host: str, port: int, model_id: str | None = None, log=None):
        self.model = model
        self.model_id = model_id or model.path.stem
        self.created = int(time.time())
        self.log = log or (lambda msg: None)
        self.records: deque = deque(maxlen=100)   # recent generations (see Generation), newest last
        self.waiting = 0                           # requests queued or running
        self._count_lock = threading.Lock()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(model, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None,
                log=None) -> EdgerunHTTPServer:
    """A server for a loaded `edgerun.Model`; call serve_forever() (port 0 picks a free port)."""
    try:
        return EdgerunHTTPServer(model, host, port, model_id, log)
    except OSError as e:
        raise EdgerunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model, host: str = "127.0.0.1", port: int = 8080, log=print) -> None:
    """Serve until Ctrl+C (the caller closes the model)."""
    httpd = make_server(model, host, port, log=log)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host} without authentication: anyone who can reach it can use the model")
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive; streams use chunked transfer encoding
    server: EdgerunHTTPServer

    def log_message(self, fmt, *args):
        self.server.log(f"{self.address_string()} {fmt % args}")

    # --- routing ------------------------------------------------------------------------
    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok", "model": self.server.model_id, "requests": self.server.waiting})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif self.path == f"/v1/models/{self.server.model_id}":
            self._json(200, self._model_card())
        else:
            self._error(404, f"no route GET {self.path}", "not_found_error")

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion}
        route = routes.get(self.path)
        if route is None:
            self._read_body()
            return self._error(404, f"no route POST {self.path}", "not_found_error")
        try:
            route(self._read_body())
        except RequestError as e:
            self._error(400, str(e))
        except EdgerunError as e:
            self._error(400 if "closed" not in str(e) else 503, str(e))

    def _model_card(self):
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "edgerun"}

    # --- endpoints ------------------------------------------------------------------------
    def _chat(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list")
        ids = self.server.model.tokenizer.encode_chat([_message(m) for m in messages])
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        self._generate(body, ids, max_tokens, "chat.completion", "chatcmpl")

    def _completion(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (one prompt per request)")
        ids = self.server.model.tokenizer.encode(prompt)
        max_tokens = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        self._generate(body, ids, max_tokens, "text_completion", "cmpl")

    def _generate(self, body, ids, max_tokens, kind, prefix):
        m = self.server.model
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported")
        if not ids or len(ids) >= m.context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context holds {m.context}")
        room = m.context - len(ids)
        if max_tokens is None:
            max_tokens = room
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError("'max_tokens' must be a positive integer")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("'stop' must be a string or a list of strings")
        sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        cancel = threading.Event()
        run = Generation(m, ids, min(max_tokens, room), sampling, stops, cancel)
        meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.server.model_id}
        watcher = threading.Thread(target=self._watch_disconnect, args=(cancel, run), daemon=True)
        with self.server._count_lock:
            self.server.waiting += 1
        watcher.start()
        try:
            if body.get("stream"):
                self._stream(run, kind, meta, bool((body.get("stream_options") or {}).get("include_usage")))
            else:
                text = "".join(run.pieces())
                if cancel.is_set():
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
        except (BrokenPipeError, ConnectionResetError):
            run.cancel.set()        # the client is gone
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
    def _read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise RequestError(f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, kind="invalid_request_error"):
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _event(self, obj):
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _message(m) -> dict:
    """An OpenAI message (content a string or a list of text parts) -> {role, content}."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError("each message needs a 'role' and 'content'")
    content = m.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise RequestError("message 'content' must be a string or a list of text parts")
    return {"role": m["role"], "content": content}


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
