"""The HTTP API on its own: the bearer token guards POST (compared in constant time), bodies are
capped, hostile bodies are quarantined or refused but never crash it, and health and metrics answer."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from daemon.health import Health
from daemon.home import Home
from daemon.http_api import MAX_BODY, Api, serve
from daemon.metrics import Metrics
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
        assert code == 500 and "RuntimeError" in answer["error"] and "again is safe" in answer["error"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
