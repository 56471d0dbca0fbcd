"""Every correction format the field uses reads into the same Correction; bad records are named."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from editors.formats import (FormatError, correction_schema, detect_format, from_record, load_corrections, parse_record, read_file,
                             read_stream, to_record)

SCHEMA = Path(__file__).resolve().parents[1] / "daemon" / "correction.schema.json"


def test_counterfact_flat_record(data_root: Path) -> None:
    record = json.loads((data_root / "counterfact" / "val.json").read_text())[0]
    [c] = parse_record(record)
    assert (c.prompt, c.target_new, c.target_old) == (record["prompt"], record["target_new"], record["ground_truth"])
    assert c.rephrases == (record["rephrase_prompt"],)
    assert c.locality_prompts[0].answer == record["locality_ground_truth"]


def test_rome_requested_rewrite_fills_the_subject_into_the_template() -> None:
    record = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
              "target_new": {"str": "violin"}, "target_true": {"str": "trumpet"}},
              "paraphrase_prompts": ["Miles Davis is known for the"], "neighborhood_prompts": ["Chet Baker plays the"]}
    [c] = parse_record(record)
    assert detect_format(record) == "rome"
    assert (c.id, c.prompt, c.target_new, c.target_old) == ("cf-7", "Miles Davis plays the", "violin", "trumpet")
    assert c.locality_prompts[0].prompt == "Chet Baker plays the" and c.locality_prompts[0].answer == "trumpet"


def test_zsre_record(data_root: Path) -> None:
    record = json.loads((data_root / "zsre" / "zsre_mend-1k.json").read_text())[0]
    [c] = parse_record(record)
    assert (c.prompt, c.target_new, c.target_old) == (record["src"], record["alt"], record["answers"][0])
    assert c.locality_prompts[0].prompt == record["loc"]


def test_mquake_case_gives_one_correction_per_rewrite(data_root: Path) -> None:
    case = json.loads((data_root / "mquake" / "MQuAKE-CF.json").read_text())[0]
    corrections = parse_record(case)
    assert len(corrections) == len(case["requested_rewrite"])
    assert corrections[0].prompt == case["requested_rewrite"][0]["prompt"].replace("{}", case["requested_rewrite"][0]["subject"])


def test_mendd_jsonl_reads_every_field(tmp_path: Path) -> None:
    line = {"id": "x1", "prompt": "The Eiffel Tower is in", "target_new": "Rome", "target_old": "Paris",
            "rephrases": ["Where is the Eiffel Tower? In"], "locality_prompts": [{"prompt": "Big Ben is in", "answer": "London"}]}
    path = tmp_path / "feed.jsonl"
    path.write_text(json.dumps(line) + "\n")
    [c] = list(read_file(path))
    assert (c.id, c.target_old, c.rephrases, c.locality_prompts[0].answer) == ("x1", "Paris", ("Where is the Eiffel Tower? In",), "London")


def test_a_bad_line_is_named_and_the_others_are_read(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text('{"prompt": "A is", "target_new": "B"}\n{not json\n{"prompt": "C is", "target_new": 5}\n{"prompt": "D is", "target_new": "E"}\n')
    items = list(read_file(path))
    errors = [i for i in items if isinstance(i, FormatError)]
    assert [e.field for e in errors] == ["(json)", "target_new"]
    assert "line 2" in str(errors[0])
    assert [i.prompt for i in items if not isinstance(i, FormatError)] == ["A is", "D is"]


def test_the_real_zsre_file_has_bad_records_that_are_set_aside(data_root: Path) -> None:
    good, bad = load_corrections(data_root / "zsre" / "zsre_mend-1k.json")
    assert bad and all(e.field == "alt" for e in bad)
    assert len(good) + len(bad) == 1000


@pytest.mark.parametrize("record", [[1, 2], "text", None])
def test_a_record_that_is_not_an_object_is_refused(record) -> None:
    with pytest.raises(FormatError, match="JSON object"):
        parse_record(record)


def test_the_demo_feed_agrees_with_the_json_schema_record_by_record() -> None:
    """The schema documents what the parser accepts: valid demo records parse, invalid ones do not."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    checked = 0
    for text in (SCHEMA.parent / "demo_feed.jsonl").read_text().splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        valid = validator.is_valid(record)
        try:
            parse_record(record, "mendd")
            parsed = True
        except FormatError:
            parsed = False
        assert valid == parsed, record
        checked += 1
    assert checked >= 19


def test_the_committed_schema_is_the_one_the_record_model_generates() -> None:
    assert SCHEMA.read_text() == correction_schema(), "regenerate it: make schema"


def test_a_mendd_record_may_give_one_rephrase_as_a_string() -> None:
    [c] = parse_record({"prompt": "A is", "target_new": "B", "rephrases": "Is A"}, "mendd")
    assert c.rephrases == ("Is A",)


def test_a_mendd_record_s_aliases_are_read_and_written_back() -> None:
    [one] = parse_record({"prompt": "Mount Kilimanjaro is in", "target_new": "Peru", "aliases": "Kilimanjaro"}, "mendd")
    [two] = parse_record({"prompt": "A is", "target_new": "B", "aliases": ["Ay", "Aa"]}, "mendd")
    assert (one.aliases, two.aliases) == (("Kilimanjaro",), ("Ay", "Aa"))
    assert from_record(two.id, to_record(two), "mendd").aliases == ("Ay", "Aa")


def test_a_mendd_record_without_an_id_gets_one_from_its_content() -> None:
    [a] = parse_record({"prompt": "A is", "target_new": "B"}, "mendd")
    [b] = parse_record({"prompt": "A is", "target_new": "B", "id": None}, "mendd")
    assert a.id == b.id and len(a.id) == 16


@pytest.mark.parametrize(("record", "field", "problem"), [
    ({"target_new": "B"}, "prompt", "is missing"),
    ({"prompt": 5, "target_new": "B"}, "prompt", "must be a string, got int"),
    ({"prompt": "A is", "target_new": " \t"}, "target_new", "is empty or whitespace"),
    ({"prompt": "A is", "target_new": "B", "id": 7}, "id", "must be a string, got int"),
    ({"prompt": "A is", "target_new": "B", "subject": ""}, "subject", "is empty or whitespace"),
    ({"prompt": "A is", "target_new": "B", "target_old": ["C"]}, "target_old", "must be a string, got list"),
    ({"prompt": "A is", "target_new": "B", "rephrases": ["ok", ""]}, "rephrases", "a list of non-empty strings"),
    ({"prompt": "A is", "target_new": "B", "aliases": ["ok", " "]}, "aliases", "a list of non-empty strings"),
    ({"prompt": "A is", "target_new": "B", "locality_prompts": {"prompt": "C"}}, "locality_prompts", "must be a list"),
    ({"prompt": "A is", "target_new": "B", "locality_prompts": ["C is"]}, "locality_prompts[0]", "must be an object"),
    ({"prompt": "A is", "target_new": "B", "locality_prompts": [{"prompt": "C is", "answer": "D"}, {"prompt": "E is"}]},
     "locality_prompts[1].answer", "is missing"),
])
def test_a_bad_mendd_field_is_named_with_its_problem(record: dict, field: str, problem: str) -> None:
    record = {"id": "r1", **record}
    with pytest.raises(FormatError) as caught:
        parse_record(record, "mendd")
    assert (caught.value.record, caught.value.field) == (str(record["id"]), field)
    assert problem in caught.value.problem


@settings(max_examples=300, deadline=None)
@given(record=st.fixed_dictionaries({}, optional={
    key: st.none() | st.integers() | st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2)
    | st.lists(st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=5), "answer": st.text(max_size=5)}), max_size=2)
    for key in ("id", "prompt", "target_new", "subject", "target_old", "rephrases", "aliases", "locality_prompts")}))
def test_the_schema_accepts_exactly_the_mendd_records_the_parser_reads(record: dict) -> None:
    import jsonschema

    valid = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).is_valid(record)
    try:
        parse_record(record, "mendd")
        parsed = True
    except FormatError:
        parsed = False
    assert valid == parsed


@pytest.mark.parametrize("bad_id", ["c1\nmendd-version: {}", "c1\x00", "c1\x07", "c1\x1e", "x" * 129, "two words", "caf\u00e9"])
@pytest.mark.parametrize("fmt", ["mendd", "counterfact"])
def test_an_id_that_breaks_the_id_rule_is_quarantined_naming_the_record_and_the_rule(bad_id: str, fmt: str) -> None:
    """Ids reach git commit messages and every listing: no id may carry a line, a control character or a novel."""
    key = "id" if fmt == "mendd" else "case_id"
    lines = [{key: bad_id, "prompt": "A is", "target_new": "B"}, {"prompt": "C is", "target_new": "D"}]
    stream = "".join(json.dumps(line) + "\n" for line in lines).encode()
    [(first, error), (second, good)] = list(read_stream(io.BytesIO(stream), fmt))
    assert isinstance(error, FormatError) and (first, error.record, error.field) == (1, "#1", "id")
    assert "128 characters" in error.problem and bad_id not in str(error)
    assert second == 2 and good.prompt == "C is"


@pytest.mark.parametrize("good_id", ["c1", "demo-01", "cf-7", "zsre-0123456789abcdef", "mquake-12-0", "0123456789abcdef",
                                     "x" * 128, "feed.a:b@c/d+e=f_g#h-9"])
def test_ids_within_the_id_rule_are_kept_as_given(good_id: str) -> None:
    [c] = parse_record({"id": good_id, "prompt": "A is", "target_new": "B"}, "mendd")
    assert c.id == good_id


def test_every_id_the_shipped_data_generates_is_within_the_id_rule(data_root: Path) -> None:
    for path in [*(data_root / name for name in ("counterfact/val.json", "zsre/zsre_mend-1k.json", "mquake/MQuAKE-CF.json")),
                 SCHEMA.parent / "demo_feed.jsonl", Path(__file__).parent / "data" / "same_subject_pairs.jsonl"]:
        _, bad = load_corrections(path)
        assert not [error for error in bad if error.field == "id"], path


def test_a_rome_record_without_a_case_id_gets_a_valid_id_from_its_position() -> None:
    record = {"requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
              "target_new": {"str": "violin"}, "target_true": {"str": "trumpet"}}}
    [(_, c)] = list(read_stream(io.BytesIO(json.dumps(record).encode() + b"\n"), "rome"))
    assert c.id == "cf-#1"


@pytest.mark.parametrize("array", [False, True])
def test_a_record_python_cannot_read_is_a_format_error_and_the_next_is_still_read(array: bool) -> None:
    """A 5,000-digit integer is valid JSON that Python refuses (int max str digits) with a plain ValueError."""
    huge = '{"prompt": "A is", "target_new": "B", "n": ' + "9" * 5000 + "}"
    good = '{"prompt": "C is", "target_new": "D"}'
    stream = f"[{huge}, {good}]" if array else f"{huge}\n{good}\n"
    items = list(read_stream(io.BytesIO(stream.encode())))
    assert isinstance(items[0][1], FormatError) and items[0][1].field == "(json)" and "digits" in items[0][1].problem
    if not array:  # an array is one JSON text: nothing in it can be read
        assert items[1][0] == 2 and items[1][1].prompt == "C is"
