"""The OpenAI-compatible endpoint of a real `mendd run` (tiny-llama), spoken to with the real `openai`
package: it lists the model, completes, chats and streams; its answers follow the served version
through an accepted correction and a rollback; it refuses a wrong token and an oversized body."""
from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import openai
import pytest

from decision_helpers import ACCEPT_ALL, make_decision_home
from service_harness import MENDD, configure, free_port, start_service, wait_for

TOKEN = "endpoint-test-token"
PROMPT = "The capital of Spain is"


@pytest.fixture(scope="module")
def service(tmp_path_factory, data_root):
    """One service for the module's tests, in the order they are written (the last ones change its version)."""
    root = tmp_path_factory.mktemp("endpoint")
    # a step large enough to change the random tiny model's greedy answer
    home = make_decision_home(root / "home", ACCEPT_ALL, data_root, {"projection": False, "step_scale": 100.0})
    port = free_port()
    configure(home, port, [], **{"token: null": f'token: "{TOKEN}"'})
    process = start_service(home, root / "service.log")
    api = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{api}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    wait_for(lambda: _listening(client), 180, "the endpoint", process)
    try:
        yield home, api, client
    finally:
        process.terminate()
        assert process.wait(timeout=120) == 0, (root / "service.log").read_text()[-3000:]


def _listening(client: openai.OpenAI) -> bool:
    try:
        return bool(client.models.list().data)
    except openai.APIConnectionError:
        return False


def test_the_model_list_names_the_served_model(service) -> None:
    _, _, client = service
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_a_greedy_completion_is_repeatable_and_names_the_served_version(service) -> None:
    _, _, client = service
    first = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    again = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    assert first.choices[0].text == again.choices[0].text != ""
    assert first.system_fingerprint == "v0000"
    assert first.usage.completion_tokens == 8 and first.choices[0].finish_reason == "length"


def test_a_chat_completion_answers_through_the_chat_template(service) -> None:
    _, _, client = service
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Where is Madrid?"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.system_fingerprint == "v0000"


def test_a_streamed_completion_says_what_the_whole_one_says(service) -> None:
    _, _, client = service
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) > 3  # pieces as they come, the end, then the counts
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_a_streamed_chat_opens_with_the_role_and_says_what_the_whole_one_says(service) -> None:
    _, _, client = service
    messages = [{"role": "user", "content": "Where is Madrid?"}]
    whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_a_stop_string_ends_the_answer_before_it(service) -> None:
    _, _, client = service
    whole = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = whole[3:5]
    cut = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_wrong_token_is_refused_with_401(service) -> None:
    _, api, _ = service
    wrong = openai.OpenAI(base_url=f"{api}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2)
    assert refused.value.status_code == 401


def test_an_oversized_body_is_refused_with_413(service) -> None:
    _, _, client = service
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="tiny-llama", prompt="x" * (1 << 21), max_tokens=2)
    assert refused.value.status_code == 413


def test_a_bad_parameter_is_named_in_an_openai_error(service) -> None:
    _, _, client = service
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"


def test_an_accepted_correction_changes_the_answer_and_a_rollback_brings_it_back(service) -> None:
    home, api, client = service
    before = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
    correction = json.dumps({"id": "lisbon", "prompt": PROMPT, "target_new": "Lisbon"}).encode()
    posted = urllib.request.Request(f"{api}/v1/corrections", data=correction, method="POST",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(posted, timeout=10) as response:
        assert response.status == 202

    def answered_by_a_new_version():
        answer = client.completions.with_raw_response.create(model="tiny-llama", prompt=PROMPT, max_tokens=8,
                                                             temperature=0)
        return answer if answer.headers["X-Mendd-Version"] != "v0000" else None

    raw = wait_for(answered_by_a_new_version, 180, "the accepted correction to be served")
    after = raw.parse()
    assert after.system_fingerprint == raw.headers["X-Mendd-Version"] == "v0001"
    assert after.choices[0].text != before.choices[0].text, after.choices[0].text

    subprocess.run([MENDD, "--home", str(home.root), "rollback", "v0000"], check=True, capture_output=True,
                   timeout=300)
    back = wait_for(lambda: (r := client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8,
                                                            temperature=0)).system_fingerprint != "v0001" and r,
                    180, "the rollback to be served")
    assert back.choices[0].text == before.choices[0].text


def test_the_endpoint_is_not_served_without_its_token_even_for_the_model_list(service) -> None:
    _, api, _ = service
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{api}/v1/models", timeout=10)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
