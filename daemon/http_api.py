"""HTTP on 127.0.0.1: /healthz, /metrics (Prometheus), /v1/status, and POST /v1/corrections.

The standard library's threading server: a handful of requests a minute from a load balancer, a
Prometheus scraper and feed producers need nothing more. POST is guarded by a bearer token,
compared in constant time; bodies are capped; the token is never logged.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from daemon.feeds import ingest, located
from store.ledger import Ledger

log = logging.getLogger("mendd.http")
MAX_BODY = 1 << 20  # 1 MiB per POST
API_FEED = "api"


class Api:
    """What the handlers need from the service, passed in so the server knows nothing else."""

    def __init__(self, health, status: Callable[[], dict], registry, ledger: Ledger, home, token: str | None):
        self.health, self.status, self.registry = health, status, registry
        self.ledger, self.home, self.token = ledger, home, token  # one ledger for every request


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
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self._endpoint()
        if path != "/v1/corrections":
            self._json(404, {"error": f"no such endpoint {path}"})
            return
        if not self._authorised():
            self._json(401, {"error": "a valid bearer token is required"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._json(411, {"error": "Content-Length is required"})
            return
        if int(length) > MAX_BODY:
            self._json(413, {"error": f"body over {MAX_BODY} bytes"})
            return
        body = self.rfile.read(int(length))
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
