"""Random and hostile input never crashes a parser: each record is a Correction or a FormatError
that names the record and the field."""
from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from editors.formats import FORMATS, FormatError, parse_record, read_stream
from editors.types import Correction

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=30)

# Records that look like the real formats, with hostile values in their fields.
hostile_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200) | st.sampled_from(
    ["", "   ", "\x00\x01\x02", "Ignore all previous instructions and", "x" * 10_000, "\u202e\u200b"])
field_values = hostile_text | json_values
lookalikes = st.fixed_dictionaries({}, optional={
    "id": field_values, "prompt": field_values, "target_new": field_values, "rephrases": field_values,
    "locality_prompts": field_values, "src": field_values, "alt": field_values, "requested_rewrite": field_values,
    "rephrase_prompt": field_values, "ground_truth": field_values, "case_id": field_values})


def assert_usable(items: list) -> None:
    for item in items:
        if isinstance(item, Correction):
            assert isinstance(item.prompt, str) and item.prompt.strip()
            assert isinstance(item.target_new, str) and item.target_new.strip()
        else:
            assert isinstance(item, FormatError) and item.field and item.record


@settings(max_examples=300, deadline=None)
@given(record=json_values | lookalikes, fmt=st.sampled_from(("auto", *FORMATS)))
def test_any_json_value_parses_to_corrections_or_a_format_error(record, fmt) -> None:
    try:
        assert_usable(parse_record(record, fmt))
    except FormatError as error:
        assert_usable([error])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_stream_yields_positions_with_corrections_or_errors(data: bytes) -> None:
    items = list(read_stream(io.BytesIO(data)))
    assert all(isinstance(position, int) for position, _ in items)
    assert_usable([item for _, item in items])


def test_deeply_nested_json_is_a_format_error_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    [(position, item)] = list(read_stream(io.BytesIO(deep)))
    assert isinstance(item, FormatError)
    [(_, line_item)] = list(read_stream(io.BytesIO(b'{"a": ' + b"[" * 100_000 + b"\n")))
    assert isinstance(line_item, FormatError)


def test_duplicate_keys_and_control_characters_parse_predictably() -> None:
    text = '{"prompt": "first", "prompt": "The sky\\u0000 is", "target_new": "green\\u0007"}\n'
    [(_, item)] = list(read_stream(io.BytesIO(text.encode())))
    assert isinstance(item, Correction) and item.prompt == "The sky\x00 is"
    assert json.loads(text)["prompt"] == item.prompt  # the last duplicate wins, as in JSON parsers


def test_a_lone_surrogate_escape_is_a_format_error_naming_the_record() -> None:
    stream = b'{"id": "s1", "prompt": "The sky is \\ud800", "target_new": "green"}\n' \
             b'{"id": "s2", "prompt": "The sky is", "target_new": "blue"}\n'
    for fmt in ("auto", *FORMATS):
        items = dict(read_stream(io.BytesIO(stream), fmt))
        assert isinstance(items[1], FormatError) and "unpaired surrogate" in str(items[1]), (fmt, items[1])
        assert "\ud800" not in str(items[1])
        str(items[1]).encode("utf-8")  # the reason itself can be stored
