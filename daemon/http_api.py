"""HTTP on 127.0.0.1: /healthz, /metrics (Prometheus), /v1/status, POST /v1/corrections, and the
OpenAI-compatible /v1/models, /v1/completions and /v1/chat/completions (daemon/openai_api.py).

The standard library's threading server: a load balancer, a Prometheus scraper, feed producers and
applications each get a thread; answers are generated one at a time by the answer worker
(daemon/answering.py), so threads only wait. POST and the model endpoints are guarded by a bearer
token, compared in constant time; bodies are capped; the token is never logged.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from daemon import openai_api
from daemon.answering import Answering, Busy, Piece
from daemon.feeds import ingest, located
from daemon.openai_api import BadRequest, error_body
from store.ledger import Ledger

log = logging.getLogger("mendd.http")
MAX_BODY = 1 << 20  # 1 MiB per POST
API_FEED = "api"
PIECE_TIMEOUT_S = 300  # the longest an application waits for the next piece of its answer
BUSY_RETRY_S = "5"


class Api:
    """What the handlers need from the service, passed in so the server knows nothing else."""

    def __init__(self, health, status: Callable[[], dict], registry, ledger: Ledger, home, token: str | None,
                 answers: Answering | None = None, model: str = ""):
        self.health, self.status, self.registry = health, status, registry
        self.ledger, self.home, self.token = ledger, home, token  # one ledger for every request
        self.answers, self.model = answers, model  # the OpenAI-compatible endpoint's, when served
        self.started = int(time.time())


def serve(api: Api, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the caller shuts it down."""
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="mendd-http", daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    api: Api
    server_version = "mendd"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)  # the path only: no headers, no token

    def do_GET(self) -> None:  # noqa: N802
        path = self._endpoint()
        if path == "/healthz":
            problems = self.api.health.problems()
            self._json(503 if problems else 200, {"ok": not problems, "problems": problems})
        elif path == "/metrics":
            self._send(200, generate_latest(self.api.registry), CONTENT_TYPE_LATEST)
        elif path == "/v1/status":
            self._json(200, self.api.status())
        elif path == "/v1/models":
            if self._openai_ready():
                self._json(200, openai_api.models_body(self.api.model, self.api.started))
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self._endpoint()
        if path in ("/v1/completions", "/v1/chat/completions"):
            self._complete(chat=path == "/v1/chat/completions")
            return
        if path != "/v1/corrections":
            self._json(404, {"error": f"no such endpoint {path}"})
            return
        if not self._authorised():
            self._json(401, {"error": "a valid bearer token is required"})
            return
        body = self._body(lambda code, message: self._json(code, {"error": message}))
        if body is None:
            return
        body = _one_line_if_single_object(body)
        items = located(API_FEED, io.BytesIO(body), "auto", f"feed:{API_FEED}")
        try:
            report = ingest(self.api.ledger, self.api.home, API_FEED, items)
        except (SQLAlchemyError, OSError) as error:  # the ledger (or its disk) cannot take writes now: ask for a retry
            log.warning("POST /v1/corrections: ledger unavailable: %s", error)
            self._json(503, {"error": f"the ledger cannot store corrections now ({type(error).__name__}); send the "
                                      "whole request again later: what was already stored is recognised, not doubled"},
                       {"Retry-After": "30"})
            return
        except Exception as error:  # a bug, not the client's fault: answer rather than drop the connection
            log.exception("POST /v1/corrections failed")
            self._json(500, {"error": f"internal error ({type(error).__name__}); see the service log. Sending the "
                                      "request again is safe: what was already stored is recognised, not doubled"})
            return
        self._json(202, {"received": report.received, "duplicates": report.duplicates,
                         "quarantined": report.quarantined, "reasons": report.reasons[:100]})

    def _body(self, refuse: Callable[[int, str], None]) -> bytes | None:
        """The request's body, or None after `refuse` has answered a missing length or an oversized body."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            refuse(411, "Content-Length is required")
            return None
        if int(length) > MAX_BODY:
            refuse(413, f"body over {MAX_BODY} bytes")
            return None
        return self.rfile.read(int(length))

    # -- the OpenAI-compatible endpoint ------------------------------------------------------

    def _openai_error(self, code: int, message: str, param: str | None = None, error_code: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error",
                500: "server_error"}.get(code, "invalid_request_error")
        self._json(code, error_body(message, kind, param, error_code), headers)

    def _openai_ready(self) -> bool:
        """Whether a model endpoint may answer; if not, the error has been sent."""
        if not self._authorised():
            self._openai_error(401, "a valid bearer token is required (Authorization: Bearer ...)", None,
                               "invalid_api_key")
            return False
        if self.api.answers is None:
            self._openai_error(503, "this server does not answer prompts", headers={"Retry-After": BUSY_RETRY_S})
            return False
        return True

    def _complete(self, chat: bool) -> None:
        if not self._openai_ready():
            return
        raw = self._body(lambda code, message: self._openai_error(code, message))
        if raw is None:
            return
        answers = self.api.answers
        try:
            try:
                decoded = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
                raise BadRequest(f"the body is not JSON: {error}") from None
            request = openai_api.parse_request(decoded, chat, self.api.model, answers.snapshot.editable.tokenizer)
            answer = answers.submit(request.asked)
        except BadRequest as error:
            self._openai_error(error.status, error.message, error.param, error.code)
            return
        except Busy as error:
            self._openai_error(503, f"the server is busy: {error}; try again shortly", None, "busy",
                               {"Retry-After": BUSY_RETRY_S})
            return
        rid = openai_api.new_id(chat)
        if request.stream:
            self._stream(request, answer, rid)
            return
        text, finish = [], None
        for piece in self._pieces(answer):
            if isinstance(piece, Exception):
                self._openai_error(500, f"generation failed ({type(piece).__name__}); see the service log")
                return
            text.append(piece.text)
            finish = piece.finish_reason
        self._json(200, openai_api.response_body(request, answer, self.api.model, "".join(text), finish, rid),
                   {"X-Mendd-Version": answer.snapshot.version})

    def _stream(self, request: openai_api.Request, answer, rid: str) -> None:
        """Server-sent events, one per piece, then `data: [DONE]`; the connection closes after."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Mendd-Version", answer.snapshot.version)
        self.end_headers()
        self.close_connection = True
        model = self.api.model
        first = request.chat
        try:
            for piece in self._pieces(answer):
                if isinstance(piece, Exception):
                    self._event(error_body(f"generation failed ({type(piece).__name__})", "server_error"))
                    break
                if first:  # a chat stream opens with the assistant's role
                    self._event(openai_api.chunk_body(request, answer, model, None, None, rid, first=True))
                    first = False
                if piece.text:
                    self._event(openai_api.chunk_body(request, answer, model, piece.text, None, rid))
                if piece.finish_reason:
                    self._event(openai_api.chunk_body(request, answer, model, None, piece.finish_reason, rid))
                    if request.usage_in_stream:
                        self._event(openai_api.chunk_body(request, answer, model, None, None, rid, counts=True))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("a client left its stream before the end")

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    @staticmethod
    def _pieces(answer):
        """The answer's pieces as they come, up to the last one (or a failure)."""
        while True:
            try:
                piece = answer.pieces.get(timeout=PIECE_TIMEOUT_S)
            except queue.Empty:
                yield TimeoutError(f"no piece of the answer in {PIECE_TIMEOUT_S} s")
                return
            yield piece
            if isinstance(piece, Exception) or (isinstance(piece, Piece) and piece.finish_reason):
                return

    def _endpoint(self) -> str:
        """The request's path without its query (a cache-buster, a probe's own parameters)."""
        return urlsplit(self.path).path

    def _authorised(self) -> bool:
        if not self.api.token:
            return True
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.api.token}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def _json(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _one_line_if_single_object(body: bytes) -> bytes:
    """A body that is one (possibly pretty-printed) JSON object becomes one JSONL line; arrays and
    JSONL pass through to the stream reader unchanged."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return body
    return json.dumps(parsed).encode() if isinstance(parsed, dict) else body
