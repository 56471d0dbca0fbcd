"""Every correction format the field uses reads into the same Correction; bad records are named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editors.formats import FormatError, detect_format, load_corrections, parse_record, read_file


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

    root = Path(__file__).resolve().parents[1] / "daemon"
    schema = json.loads((root / "correction.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    checked = 0
    for text in (root / "demo_feed.jsonl").read_text().splitlines():
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
