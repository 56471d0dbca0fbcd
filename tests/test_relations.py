"""policies/relations.py: which relation a correction asks, and the other questions about its subject
(issue #35), read from policies/data/relations/relations.json."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from editors.formats import load_corrections
from editors.types import Correction
from policies.relations import Relations, half, load_relations, normalized, other_questions, questions_about, relation_of


@pytest.fixture(scope="module")
def relations(data_root: Path) -> Relations:
    return load_relations(data_root)


@pytest.fixture(scope="module")
def counterfact(data_root: Path) -> list[Correction]:
    return load_corrections(data_root / "counterfact" / "val.json", limit=300)[0]


def vendored_templates(data_root: Path) -> set[str]:
    """Every CounterFact train and val prompt with its subject taken out, and every known fact's
    template and prompt so."""
    records = [r for split in ("train", "val") for r in json.loads((data_root / "counterfact" / f"{split}.json").read_text())]
    facts = json.loads((data_root / "known" / "known_1000.json").read_text())
    return ({r["prompt"].replace(r["subject"], "{}") for r in records} | {f["template"] for f in facts}
            | {f["prompt"].replace(f["subject"], "{}") for f in facts})


def test_every_vendored_template_is_filed_under_exactly_one_relation(data_root: Path, relations: Relations) -> None:
    filed = [{normalized(t) for t in r.templates} for r in relations.by_id.values()]
    for template in vendored_templates(data_root):
        assert sum(normalized(template) in forms for forms in filed) == 1, template


def test_the_relation_of_a_counterfact_record_is_read_from_its_prompt(relations: Relations) -> None:
    record = Correction("cf", "The mother tongue of  Danielle Darrieux is", "English", subject="danielle darrieux")
    assert relation_of(record, relations).id == "P103"


def test_a_prompt_of_no_known_template_or_without_its_subject_has_no_relation(relations: Relations) -> None:
    assert relation_of(Correction("a", "Danielle Darrieux once dreamt of", "x", subject="Danielle Darrieux"), relations) is None
    assert relation_of(Correction("b", "The mother tongue of Danielle Darrieux is", "x"), relations) is None
    assert relation_of(Correction("c", "The mother tongue of Danielle Darrieux is", "x", subject="Paris"), relations) is None


def test_other_questions_name_the_subject_and_never_ask_what_the_correction_answers(
        counterfact: list[Correction], relations: Relations) -> None:
    for record in counterfact:
        own = relation_of(record, relations)
        asked = other_questions(record, relations, 2, random.Random(0))
        assert len(asked) == 2
        for question in asked:
            assert question.correction_id == record.id and record.subject in question.text
            assert question.relation_id not in relations.asking_as(own.id)
            assert own.kinds[0] in relations.by_id[question.relation_id].kinds


def test_other_questions_are_the_same_for_the_same_seed(counterfact: list[Correction], relations: Relations) -> None:
    def drawn(seed: int) -> list:
        return [other_questions(record, relations, 2, random.Random(seed)) for record in counterfact]

    assert drawn(1) == drawn(1) != drawn(2)


def test_a_correction_of_an_unknown_relation_gets_no_other_questions(relations: Relations) -> None:
    record = Correction("a", "Danielle Darrieux once dreamt of", "x", subject="Danielle Darrieux")
    assert other_questions(record, relations, 2, random.Random(0)) == []


def test_a_relation_another_correction_holds_about_the_subject_is_not_asked_as_another(relations: Relations) -> None:
    born = Correction("born", "Isaac Newton was born in", "Rome", subject="Isaac Newton")
    studied = Correction("studied", "Isaac Newton studied at", "Oxford", subject="Isaac Newton")
    asked = questions_about([born, studied], relations, 40, seed=0)
    assert {q.relation_id for q in asked if q.correction_id == "born"} >= {"P20", "P27"}
    assert not {"P19", "P69"} & {q.relation_id for q in asked}


def test_a_correction_keeps_its_questions_whatever_set_it_is_asked_in(counterfact: list[Correction],
                                                                     relations: Relations) -> None:
    alone = questions_about(counterfact[:1], relations, 2, seed=0)
    assert [q for q in questions_about(counterfact[:20], relations, 2, seed=0) if q.correction_id == counterfact[0].id] == alone


def test_half_splits_subjects_evenly_and_always_the_same_way(data_root: Path) -> None:
    subjects = {r["subject"] for r in json.loads((data_root / "counterfact" / "val.json").read_text())}
    halves = [half(s) for s in sorted(subjects)]
    assert halves == [half(s) for s in sorted(subjects)]
    assert 0.45 < halves.count("measuring") / len(halves) < 0.55
    assert half("Isaac Newton") == half(" isaac  NEWTON ")
