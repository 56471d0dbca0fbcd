"""HTTP on 127.0.0.1: /healthz, /metrics (Prometheus), /v1/status, POST /v1/corrections, and the
OpenAI-compatible /v1/models, /v1/completions and /v1/chat/completions (daemon/openai_api.py).

One client cannot take the server. A connection costs no thread until its request starts to arrive:
until then it waits in one selector, and is closed after IDLE_S of silence; a fixed pool of HANDLERS
threads reads and answers requests; a request's head and body must arrive within READ_S, and a
client that stops reading is dropped after SEND_S. Answers are generated one at a time by the answer
worker (daemon/answering.py), and an answer whose client has left is cancelled. Every refusal is an
answer (4xx in JSON), never a dropped connection.

POST and the model endpoints are guarded by a bearer token, compared in constant time; without one,
a POST from another site's page (its Origin header) is refused, as any page the operator opens
could send it. Bodies and records per POST are capped; the token is never logged.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from daemon import openai_api
from daemon.answering import Answer, Answering, Busy, Piece, TooLong
from daemon.feeds import ingest, located
from daemon.openai_api import BadRequest, error_body
from editors.formats import FormatError
from editors.types import Correction
from store.ledger import Ledger

log = logging.getLogger("mendd.http")
MAX_BODY = 1 << 20  # 1 MiB per POST
MAX_RECORDS = 1000  # per POST /v1/corrections: more is refused whole, so the client can split it
MAX_UNREADABLE = 100  # per POST: more is refused whole; each one stored costs a few ledger writes
API_FEED = "api"
HANDLERS = 64  # threads that read and answer requests; a request beyond them waits for one
MAX_IDLE = 1024  # connections waiting for their request; beyond it the oldest is closed
IDLE_S = 10.0  # a connection that sends nothing for this long is closed
READ_S = 30.0  # the most a request's head and body may take to arrive, once it has begun
SEND_S = 30.0  # the most one write may wait for a client that does not read
PIECE_TIMEOUT_S = 300  # the longest an application waits for the next piece of its answer
CLIENT_CHECK_S = 0.5  # how often a request waiting for its answer checks that its client is there
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
    server = _Server((host, port), type("Handler", (_Handler,), {"api": api}))
    threading.Thread(target=server.serve_forever, name="mendd-http", daemon=True).start()
    return server


class _Server(ThreadingHTTPServer):
    """Accepted connections wait for their request in one selector (the watcher's), costing no
    thread; once bytes arrive, one of HANDLERS threads takes the connection. So idle or half-open
    sockets hold no thread, and cannot keep /healthz waiting. The handlers live as long as the
    server: they must run no torch (daemon/compute.py), and they do not: the answer worker does."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog, for bursts the accepting thread has not reached

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        super().__init__(address, handler)
        self._accepted: queue.SimpleQueue = queue.SimpleQueue()  # for the watcher
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # connections with a request, for a handler
        self._wake, self._waker = socket.socketpair()  # wakes the watcher for a new connection or to stop
        self._waker.setblocking(False)
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="mendd-http-idle", daemon=True).start()
        for _ in range(HANDLERS):
            threading.Thread(target=self._handle_ready, name="mendd-http-handler", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        self._accepted.put((request, client_address))
        self._nudge()

    def shutdown(self) -> None:
        """Stop accepting, close the connections still idle and end the handlers once they are done."""
        super().shutdown()
        self._stopping.set()
        self._nudge()
        for _ in range(HANDLERS):
            self._ready.put(None)

    def _nudge(self) -> None:
        try:
            self._waker.send(b"\0")
        except OSError:  # the watcher has a wake-up pending already, or has stopped
            pass

    def _handle_ready(self) -> None:
        while (ready := self._ready.get()) is not None:
            self.process_request_thread(*ready)

    def _watch(self) -> None:
        idle: dict[socket.socket, tuple[object, float]] = {}  # connection: (address, deadline), oldest first
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake, selectors.EVENT_READ)

            def drop(connection: socket.socket) -> None:
                selector.unregister(connection)
                del idle[connection]
                self.shutdown_request(connection)

            while not self._stopping.is_set():
                wait = max(0.0, next(iter(idle.values()))[1] - time.monotonic()) if idle else None
                for key, _ in selector.select(wait):
                    if key.fileobj is self._wake:
                        self._wake.recv(4096)
                    else:  # bytes (or the end) have come: a handler reads the request
                        selector.unregister(key.fileobj)
                        self._ready.put((key.fileobj, idle.pop(key.fileobj)[0]))
                while not self._accepted.empty():
                    connection, address = self._accepted.get()
                    if len(idle) >= MAX_IDLE:
                        drop(next(iter(idle)))
                    selector.register(connection, selectors.EVENT_READ)
                    idle[connection] = (address, time.monotonic() + IDLE_S)
                while idle and next(iter(idle.values()))[1] <= time.monotonic():
                    drop(next(iter(idle)))
            for connection in list(idle):
                drop(connection)
        self._wake.close()
        self._waker.close()


class _Arriving(io.RawIOBase):
    """A connection's incoming bytes, given up on (TimeoutError) once its request has taken READ_S.
    The socket's own timeout bounds each read only: a client sending a byte at a time would keep
    its handler forever."""

    def __init__(self, connection: socket.socket):
        self._connection, self._deadline = connection, time.monotonic() + READ_S

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request took over {READ_S:g} s to arrive")
        self._connection.settimeout(left)
        try:
            return self._connection.recv_into(buffer)
        finally:
            self._connection.settimeout(SEND_S)


class _Handler(BaseHTTPRequestHandler):
    api: Api
    server_version = "mendd"
    sys_version = ""
    timeout = SEND_S  # the socket's: bounds each write (reads are bounded by _Arriving)
    responded = False  # whether a status line has been sent

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: requests are read through _Arriving's deadline instead
        self.rfile = io.BufferedReader(_Arriving(self.connection))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)  # the path only: no headers, no token

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        super().send_response(code, message)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, respond: Callable[[], None]) -> None:
        """Run `respond`: a refusal is answered with its status, a bug with 500; never a dropped connection."""
        try:
            respond()
        except BadRequest as refusal:
            self._error(refusal.status, refusal.message, refusal.param, refusal.code)
        except Exception as error:
            log.exception("%s %s failed", self.command, self._endpoint())
            if not self.responded:
                self._error(500, f"internal error ({type(error).__name__}); see the service log")

    def _get(self) -> None:
        path = self._endpoint()
        if path == "/healthz":
            problems = self.api.health.problems()
            self._json(503 if problems else 200, {"ok": not problems, "problems": problems})
        elif path == "/metrics":
            self._send(200, generate_latest(self.api.registry), CONTENT_TYPE_LATEST)
        elif path == "/v1/status":
            self._json(200, self.api.status())
        elif path == "/v1/models":
            self._authorise()
            self._answers()
            self._json(200, openai_api.models_body(self.api.model, self.api.started))
        else:
            raise BadRequest(f"no such endpoint {path}", status=404)

    def _post(self) -> None:
        path = self._endpoint()
        if path not in ("/v1/corrections", "/v1/completions", "/v1/chat/completions"):
            raise BadRequest(f"no such endpoint {path}", status=404)
        self._authorise()
        if not self.api.token and not self._same_origin():
            raise BadRequest(f"this server has no token, so it refuses POSTs from other sites' pages (Origin "
                             f"{self.headers.get('Origin')!r}, Sec-Fetch-Site {self.headers.get('Sec-Fetch-Site')!r}); "
                             "send it without a browser, or set http.token", status=403)
        if path == "/v1/corrections":
            self._corrections()
        else:
            self._complete(chat=path == "/v1/chat/completions")

    def _corrections(self) -> None:
        items = posted_records(self._body())
        if len(items) > MAX_RECORDS:
            raise BadRequest(f"over {MAX_RECORDS} records in one request; nothing was stored: send them in requests "
                             f"of at most {MAX_RECORDS}", status=413)
        unreadable = [item for _, item in items if isinstance(item, FormatError)]
        if len(unreadable) > MAX_UNREADABLE:
            raise BadRequest(f"{len(unreadable)} of the {len(items)} records cannot be read (the first: {unreadable[0]}); "
                             f"nothing was stored: fix them, or send at most {MAX_UNREADABLE} unreadable records "
                             "in one request")
        try:
            report = ingest(self.api.ledger, self.api.home, API_FEED, items)
        except (SQLAlchemyError, OSError) as error:  # the ledger (or its disk) cannot take writes now: ask for a retry
            log.warning("POST /v1/corrections: ledger unavailable: %s", error)
            self._error(503, f"the ledger cannot store corrections now ({type(error).__name__}); send the whole "
                             "request again later: what was already stored is recognised, not doubled",
                        headers={"Retry-After": "30"})
            return
        except Exception as error:  # a bug, not the client's fault: answer rather than drop the connection
            log.exception("POST /v1/corrections failed")
            self._error(500, f"internal error ({type(error).__name__}); see the service log. Sending the request "
                             "again is safe: what was already stored is recognised, not doubled")
            return
        self._json(202, {"received": report.received, "duplicates": report.duplicates,
                         "quarantined": report.quarantined, "reasons": report.reasons[:100]})

    def _body(self) -> bytes:
        """The request's body; BadRequest for a missing, malformed or oversized length, or a body that
        does not arrive whole."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("Content-Length is required", status=411)
        if not (length.isascii() and length.isdigit()):
            raise BadRequest(f"Content-Length must be a number of bytes, not {length[:20]!r}")
        if len(length) > len(str(MAX_BODY)) or int(length) > MAX_BODY:
            raise BadRequest(f"body over {MAX_BODY} bytes", status=413)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {READ_S:g} s", status=408) from None
        if len(body) < int(length):
            raise BadRequest(f"the body ended after {len(body)} of its {length} bytes")
        return body

    # -- the OpenAI-compatible endpoint ------------------------------------------------------

    def _answers(self) -> Answering:
        if self.api.answers is None:
            raise BadRequest("this server does not answer prompts", status=503)
        return self.api.answers

    def _complete(self, chat: bool) -> None:
        answers = self._answers()
        raw = self._body()
        try:
            decoded = json.loads(raw)
        except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, too deep, an integer over 4,300 digits
            raise BadRequest(f"the body is not JSON: {error}") from None
        request = openai_api.parse_request(decoded, chat, self.api.model, answers.snapshot.editable.tokenizer)
        try:
            answer = answers.submit(request.asked)
        except TooLong as error:
            raise BadRequest(str(error), "messages" if chat else "prompt", 400, "context_length_exceeded") from None
        except Busy as error:
            self._error(503, f"the server is busy: {error}; try again shortly", None, "busy",
                        {"Retry-After": BUSY_RETRY_S})
            return
        try:
            (self._stream if request.stream else self._whole)(request, answer, openai_api.new_id(chat))
        except OSError as error:  # the client left, or stopped reading
            log.info("a client left before the end of its answer (%s)", type(error).__name__)
        finally:
            answer.cancelled.set()  # no one waits for the rest: the worker stops (a no-op once it is whole)

    def _whole(self, request: openai_api.Request, answer: Answer, rid: str) -> None:
        text, finish = [], None
        for piece in self._pieces(answer):
            if isinstance(piece, Exception):
                self._error(500, f"generation failed ({type(piece).__name__}); see the service log")
                return
            text.append(piece.text)
            finish = piece.finish_reason
        self._json(200, openai_api.response_body(request, answer, self.api.model, "".join(text), finish, rid),
                   {"X-Mendd-Version": answer.snapshot.version})

    def _stream(self, request: openai_api.Request, answer: Answer, rid: str) -> None:
        """Server-sent events, one per piece, then `data: [DONE]`; the connection closes after."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Mendd-Version", answer.snapshot.version)
        self.end_headers()
        self.close_connection = True
        model = self.api.model
        first = request.chat
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

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _pieces(self, answer: Answer) -> Iterator[Piece | Exception]:
        """The answer's pieces as they come, up to the last one (or a failure); ConnectionAbortedError
        once the client has closed its connection."""
        deadline = time.monotonic() + PIECE_TIMEOUT_S
        while True:
            if self._client_left():
                raise ConnectionAbortedError("the client closed its connection")
            try:
                piece = answer.pieces.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    yield TimeoutError(f"no piece of the answer in {PIECE_TIMEOUT_S} s")
                    return
                continue
            deadline = time.monotonic() + PIECE_TIMEOUT_S
            yield piece
            if isinstance(piece, Exception) or piece.finish_reason:
                return

    def _client_left(self) -> bool:
        """Whether the client has closed its side: its socket reads as ended (peeked: nothing is consumed)."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:  # reset
            return True

    # -- common --------------------------------------------------------------------------------

    def _endpoint(self) -> str:
        """The request's path without its query (a cache-buster, a probe's own parameters)."""
        return urlsplit(self.path).path

    def _authorise(self) -> None:
        """BadRequest (401) unless the request carries the token, when one is set."""
        if not self.api.token:
            return
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.api.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise BadRequest("a valid bearer token is required (Authorization: Bearer ...)", None, 401,
                             "invalid_api_key")

    def _same_origin(self) -> bool:
        """Whether a browser sent this from a page of this server, or no browser sent it (no Origin).
        Names other than loopback ones are refused even when they resolve here (DNS rebinding)."""
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        parts = urlsplit(origin)
        try:
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:  # a port that is not a number
            return False
        host, own_port = self.server.server_address[:2]
        return port == own_port and parts.hostname in ("localhost", "127.0.0.1", "::1", host)

    def _error(self, code: int, message: str, param: str | None = None, error_code: str | None = None,
               headers: dict[str, str] | None = None) -> None:
        """An error in OpenAI's shape, on every endpoint: a client reads one shape from this server."""
        kind = {401: "authentication_error", 403: "permission_error", 500: "server_error",
                503: "server_error"}.get(code, "invalid_request_error")
        self._json(code, error_body(message, kind, param, error_code), headers)

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


def posted_records(body: bytes) -> list[tuple[str, Correction | FormatError]]:
    """The records of a POST /v1/corrections body, as ingest takes them (one past MAX_RECORDS at most,
    so an oversized body is known without reading all of it)."""
    body = _one_line_if_single_object(body)
    return list(islice(located(API_FEED, io.BytesIO(body), "auto", f"feed:{API_FEED}"), MAX_RECORDS + 1))


def _one_line_if_single_object(body: bytes) -> bytes:
    """A body that is one (possibly pretty-printed) JSON object becomes one JSONL line; arrays and
    JSONL pass through to the stream reader unchanged."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep, an integer over 4,300 digits
        return body
    return json.dumps(parsed).encode() if isinstance(parsed, dict) else body
