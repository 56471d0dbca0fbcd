"""The HTTP API on its own: the bearer token guards POST (compared in constant time), bodies are
capped, hostile bodies are quarantined or refused but never crash it, and health and metrics answer."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from daemon.health import Health
from daemon.home import Home
from daemon import http_api
from daemon.http_api import MAX_BODY, Api, serve
from daemon.metrics import Metrics
from http_client import exchange, leaves_after_first_piece, posted
from store.ledger import Ledger

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = Home(tmp_path_factory.mktemp("api") / "home")
    home.state_dir.mkdir(parents=True)
    health = Health()
    ledger = Ledger(home.ledger_url)
    server = serve(Api(health, lambda: {"version": "v0000"}, Metrics().registry, ledger, home, TOKEN), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}", home, health
    server.shutdown()
    ledger.close()


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/v1/corrections", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_post_without_or_with_a_wrong_token_is_refused(api) -> None:
    url, _, _ = api
    body = json.dumps({"prompt": "The sky is", "target_new": "green"}).encode()
    assert post(url, body, token=None)[0] == 401
    assert post(url, body, token="s3cret-tokeX")[0] == 401
    code, answer = post(url, body)
    assert code == 202 and answer["received"] + answer["duplicates"] == 1


def test_a_body_over_the_cap_is_refused_before_it_is_read(api) -> None:
    import http.client

    url, _, _ = api
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    try:
        # Only the headers are sent: the refusal must come from Content-Length, before any body is read.
        connection.putrequest("POST", "/v1/corrections")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        connection.endheaders()
        assert connection.getresponse().status == 413
    finally:
        connection.close()


def test_health_answers_503_with_the_reason_when_degraded(api) -> None:
    url, _, health = api
    health.degrade("feed:web", "unreachable")
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=5)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as error:
        assert error.code == 503 and json.loads(error.read())["problems"] == {"feed:web": "unreachable"}
    health.clear("feed:web")
    assert urllib.request.urlopen(f"{url}/healthz", timeout=5).status == 200
    assert b"mendd_corrections" in urllib.request.urlopen(f"{url}/metrics", timeout=5).read()


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=3000) | st.text(max_size=3000).map(str.encode) | st.recursive(
    st.none() | st.text(max_size=30) | st.integers(), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_any_body_is_accepted_or_quarantined_never_a_server_error(api, body: bytes) -> None:
    url, home, _ = api
    ledger = Ledger(home.ledger_url)
    try:
        before = len(ledger.corrections())
        code, answer = post(url, body)
        after = len(ledger.corrections())
    finally:
        ledger.close()
    if code == 400:  # too many unreadable records: refused whole
        assert "nothing was stored" in answer["error"]["message"] and after == before
    else:
        assert code == 202, answer
        assert after - before == answer["received"] + answer["quarantined"]


def test_a_query_string_does_not_change_which_endpoint_answers(api) -> None:
    url, _, _ = api
    for endpoint in ("/healthz?x", "/metrics?probe=1", "/v1/status?"):
        assert urllib.request.urlopen(f"{url}{endpoint}", timeout=5).status == 200
    request = urllib.request.Request(f"{url}/v1/corrections?source=test", data=b'{"prompt": "a", "target_new": "b"}',
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert urllib.request.urlopen(request, timeout=30).status == 202


def test_many_requests_share_the_one_ledger_the_api_is_given(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.state_dir.mkdir(parents=True)
    ledger = Ledger(home.ledger_url)
    opened = []
    event.listen(ledger.engine, "connect", lambda *_: opened.append(1))
    server = serve(Api(Health(), lambda: {}, Metrics().registry, ledger, home, TOKEN), "127.0.0.1", 0)
    try:
        for i in range(20):
            assert post(f"http://127.0.0.1:{server.server_address[1]}", json.dumps(
                {"id": f"c{i}", "prompt": f"Fact {i} is", "target_new": "x"}).encode())[0] == 202
    finally:
        server.shutdown()
    assert len(ledger.corrections()) == 20
    assert len(opened) <= 1  # its pool's connection, used by one request after another
    ledger.close()


def test_the_token_never_reaches_the_log(api, caplog) -> None:
    url, _, _ = api
    with caplog.at_level("DEBUG", logger="mendd.http"):
        post(url, b'{"prompt": "a", "target_new": "b"}')
    assert TOKEN not in caplog.text


def test_an_unexpected_error_in_a_post_is_answered_500_and_the_server_keeps_serving(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.state_dir.mkdir(parents=True)

    class BrokenLedger(Ledger):
        def receive_many(self, *_args, **_kwargs) -> list[bool]:
            raise RuntimeError("a bug, not a storage fault")

    server = serve(Api(Health(), lambda: {"version": "v0000"}, Metrics().registry, BrokenLedger(home.ledger_url), home, TOKEN),
                   "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, answer = post(url, json.dumps({"prompt": "The sky is", "target_new": "green"}).encode())
        assert code == 500 and "RuntimeError" in answer["error"]["message"] and "again is safe" in answer["error"]["message"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()


# -- a hostile client (issue #34): the endpoint stays with every other client ---------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def endpoint(tiny, tmp_path_factory):
    """The model endpoint over the tiny model, without a token (as on loopback): its port and home."""
    served = _served(tiny, tmp_path_factory.mktemp("endpoint") / "home")
    with served as (port, home, _):
        yield port, home


class _served:
    """A real server with the OpenAI-compatible endpoint; `seconds_per_token` slows its model, so an
    answer that is not cancelled keeps the worker busy for long."""

    def __init__(self, tiny, root: Path, seconds_per_token: float = 0.0, depth: int = 16, token: str | None = None):
        self.tiny, self.root, self.pause, self.depth, self.token = tiny, root, seconds_per_token, depth, token

    def __enter__(self):
        from daemon.answering import Answering, Snapshot

        home = Home(self.root)
        home.state_dir.mkdir(parents=True)
        snapshot = Snapshot.of("v0001", self.tiny, None)
        if self.pause:
            forward = snapshot.editable.model.forward

            def slowed(*args, **kwargs):
                time.sleep(self.pause)
                return forward(*args, **kwargs)

            snapshot.editable.model.forward = slowed
        self.answers = Answering(snapshot, self.depth)
        self.ledger = Ledger(home.ledger_url)
        self.server = serve(Api(Health(), dict, Metrics().registry, self.ledger, home, self.token, self.answers,
                                "tiny-llama"), "127.0.0.1", 0)
        return self.server.server_address[1], home, self.answers

    def __exit__(self, *_):
        self.server.shutdown()
        self.answers.close()
        self.ledger.close()


def completion(**fields) -> bytes:
    return json.dumps({"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields}).encode()


def openai_error(response: tuple[int, dict[str, str], bytes]) -> tuple[int, dict]:
    code, headers, body = response
    assert headers["Content-Type"] == "application/json", response
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return code, error


def test_300_idle_connections_do_not_keep_health_from_answering(endpoint) -> None:
    port, _ = endpoint
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - threads < 10  # idle sockets hold no thread
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        assert time.monotonic() - started < 1.0
    finally:
        for connection in idle:
            connection.close()


def test_a_connection_that_sends_nothing_is_closed(tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(http_api, "IDLE_S", 0.5)
    with _served(tiny, tmp_path / "home") as (port, _, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server
            assert time.monotonic() - started < 5


def test_a_body_that_stops_arriving_is_answered_408(tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(http_api, "READ_S", 1.0)
    with _served(tiny, tmp_path / "home") as (port, _, _):
        code, error = openai_error(exchange(port, posted("/v1/completions", b'{"prompt": "The', length="100")))
        assert code == 408


def test_a_request_trickling_its_head_is_dropped_before_long(tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(http_api, "READ_S", 1.0)
    with _served(tiny, tmp_path / "home") as (port, _, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle:
            started = time.monotonic()
            with pytest.raises(OSError):  # broken pipe or reset once the server has closed it
                for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 10:
                    trickle.send(bytes([byte]))
                    time.sleep(0.05)
            assert time.monotonic() - started < 5


@pytest.mark.parametrize("length", ["abc", "-1", "1.5", "\u00b2", "9" * 5000, ""])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/corrections"])
def test_a_malformed_content_length_is_answered_4xx_in_openais_shape(endpoint, path: str, length: str) -> None:
    port, _ = endpoint
    code, error = openai_error(exchange(port, posted(path, b"", length=length)))
    assert 400 <= code < 500 and error["message"], error


@pytest.mark.parametrize("body", [
    b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",  # json.loads' ValueError: over 4,300 digits
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": "a", "temperature": 1e999}',
    b'{"prompt": "a", "seed": ' + b"9" * 100 + b"}",
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}',
    b"\xff\xfe", b"", b"null", b"[]", b'"text"',
])
def test_a_malformed_completion_is_answered_400_in_openais_shape(endpoint, body: bytes) -> None:
    port, _ = endpoint
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    code, error = openai_error(exchange(port, posted(path, body), timeout=30))
    assert code == 400, error


def test_a_prompt_longer_than_the_context_window_is_refused_before_it_queues(endpoint) -> None:
    port, _ = endpoint
    huge = completion(prompt="x " * ((http_api.MAX_BODY - 200) // 2))
    started = time.monotonic()
    code, error = openai_error(exchange(port, posted("/v1/completions", huge)))
    assert time.monotonic() - started < 2
    assert (code, error["param"], error["code"]) == (400, "prompt", "context_length_exceeded")
    code, error = openai_error(exchange(port, posted("/v1/completions", completion(prompt="Paris and " * 100))))
    assert (code, error["param"], error["code"]) == (400, "prompt", "context_length_exceeded")
    assert "256" in error["message"]  # the tiny model's window
    code, error = openai_error(exchange(port, posted("/v1/completions", completion(max_tokens=1024))))
    assert (code, error["code"]) == (400, "context_length_exceeded")
    chat = json.dumps({"messages": [{"role": "user", "content": "Rome and " * 100}], "max_tokens": 4}).encode()
    code, error = openai_error(exchange(port, posted("/v1/chat/completions", chat)))
    assert (code, error["param"], error["code"]) == (400, "messages", "context_length_exceeded")


@pytest.mark.parametrize("stream", [True, False])
def test_answers_whose_clients_left_stop_and_the_next_client_is_answered_soon(tiny, tmp_path: Path,
                                                                              stream: bool) -> None:
    # 200 tokens at 20 ms each: 4 s per answer, 24 s for six, if they were not cancelled
    with _served(tiny, tmp_path / "home", seconds_per_token=0.02) as (port, _, _):
        asked = posted("/v1/completions", completion(max_tokens=200, stream=stream))
        leaving = [threading.Thread(target=leaves_after_first_piece, args=(port, asked, stream)) for _ in range(6)]
        for client in leaving:
            client.start()
        for client in leaving:
            client.join(timeout=60)
        started = time.monotonic()
        code, _, body = exchange(port, posted("/v1/completions", completion()), timeout=30)
        assert code == 200 and json.loads(body)["usage"]["completion_tokens"] == 4
        assert time.monotonic() - started < 10


def test_a_full_queue_answers_503_with_retry_after_at_once(tiny, tmp_path: Path) -> None:
    with _served(tiny, tmp_path / "home", seconds_per_token=0.02, depth=1) as (port, _, _):
        holding = []
        for _ in range(2):  # one being answered, one waiting
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            connection.sendall(posted("/v1/completions", completion(max_tokens=200, stream=True)))
            received = b""
            while b"\r\n\r\n" not in received:  # a stream's head is sent once its request is queued
                received += connection.recv(4096)
            holding.append(connection)
        started = time.monotonic()
        code, headers, body = exchange(port, posted("/v1/completions", completion()))
        assert (code, json.loads(body)["error"]["code"]) == (503, "busy") and int(headers["Retry-After"]) > 0
        assert time.monotonic() - started < 1
        for connection in holding:
            connection.close()


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "cross-site"}])
def test_without_a_token_a_post_from_another_sites_page_is_refused(endpoint, headers: dict[str, str]) -> None:
    port, home = endpoint
    correction = json.dumps({"prompt": "The sky is", "target_new": "green"}).encode()
    code, _, body = exchange(port, posted("/v1/corrections", correction, headers))
    assert code == 403 and "Origin" in json.loads(body)["error"]["message"]
    code, error = openai_error(exchange(port, posted("/v1/completions", completion(), headers)))
    assert code == 403
    ledger = Ledger(home.ledger_url)
    try:
        assert not ledger.corrections()
    finally:
        ledger.close()


def test_without_a_token_the_servers_own_pages_and_non_browsers_may_post(endpoint) -> None:
    port, _ = endpoint
    for headers in ({}, {"Origin": f"http://127.0.0.1:{port}"}, {"Origin": f"http://localhost:{port}"},
                    {"Sec-Fetch-Site": "same-origin"}):
        assert exchange(port, posted("/v1/completions", completion(), headers), timeout=30)[0] == 200


def test_with_a_token_the_token_decides_whatever_the_origin(api) -> None:
    url, _, _ = api
    request = urllib.request.Request(f"{url}/v1/corrections", data=b'{"prompt": "The sea is", "target_new": "red"}',
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                             "Origin": "http://evil.example"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202


def test_more_records_than_one_post_may_carry_are_refused_whole(api) -> None:
    url, home, _ = api
    ledger = Ledger(home.ledger_url)
    try:
        before = len(ledger.corrections())
        code, answer = post(url, b"{}\n" * (http_api.MAX_RECORDS + 1))
        assert code == 413 and str(http_api.MAX_RECORDS) in answer["error"]["message"]
        assert len(ledger.corrections()) == before  # nothing stored: the client splits and sends again
    finally:
        ledger.close()


def test_a_correction_with_an_integer_json_cannot_read_is_quarantined(api) -> None:
    url, _, _ = api
    code, answer = post(url, b'{"prompt": "The sky is", "target_new": ' + b"9" * 5000 + b"}")
    assert code == 202 and answer["quarantined"] + answer["duplicates"] == 1


def test_more_unreadable_records_than_one_post_may_carry_are_refused_whole(api) -> None:
    url, home, _ = api
    ledger = Ledger(home.ledger_url)
    try:
        before = len(ledger.corrections())
        code, answer = post(url, b"{}\n" * (http_api.MAX_UNREADABLE + 1) + b'{"prompt": "The sea is", "target_new": "red"}')
        assert code == 400 and "nothing was stored" in answer["error"]["message"] and "#1" in answer["error"]["message"]
        assert len(ledger.corrections()) == before
    finally:
        ledger.close()


def test_the_most_records_one_post_may_carry_are_stored_in_seconds(api) -> None:
    url, _, _ = api
    good = (json.dumps({"id": f"bulk{i}", "prompt": f"Bulk fact {i} is", "target_new": "x"}).encode()
            for i in range(http_api.MAX_RECORDS - http_api.MAX_UNREADABLE))
    bad = (json.dumps({"junk": i}).encode() for i in range(http_api.MAX_UNREADABLE))
    started = time.monotonic()
    code, answer = post(url, b"\n".join([*good, *bad]))
    assert code == 202 and answer["received"] == http_api.MAX_RECORDS - http_api.MAX_UNREADABLE
    assert answer["quarantined"] + answer["duplicates"] == http_api.MAX_UNREADABLE
    assert time.monotonic() - started < 10
