"""What a correction asks about its subject, and the other questions about that subject (issue #35).

A correction "Isaac Newton was born in -> Rome" answers one question about Isaac Newton; asked
anything else about him ("Isaac Newton studied at"), the served model should answer as the base
model did. To measure that, a correction's relation is read from its prompt (the subject taken out,
matched against the templates of `policies/data/relations/relations.json`), and other questions are
made from the forms of other relations that ask about the same kind of subject: never one of a
relation that asks the same question in other words (a native language beside a language spoken),
since the correction rightly answers those.

`half` splits subjects into a tuning half and a measuring half, so that designs and thresholds are
chosen on questions about subjects they are never measured on.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from editors.types import Correction

KINDS = ("person", "place", "organisation", "work", "product", "other")
HALVES = ("tuning", "measuring")


@dataclass(frozen=True)
class Relation:
    id: str  # the Wikidata property, e.g. P19
    name: str
    kinds: tuple[str, ...]  # the kinds of subject it asks about, the most common first
    templates: tuple[str, ...]  # cloze prompts, "{}" for the subject, ending where the answer begins
    asks: tuple[str, ...]  # the templates that ask this and nothing else: other questions are made of them
    questions: tuple[str, ...]  # question forms the answer follows: "Where was {} born? {} was born in"


@dataclass(frozen=True)
class OtherQuestion:
    correction_id: str  # the correction whose subject it asks about
    relation_id: str  # what it asks
    text: str


@dataclass(frozen=True)
class Relations:
    by_id: Mapping[str, Relation]  # in the file's order
    same_question: tuple[frozenset[str], ...]  # relation ids that ask the same question in other words
    forms: Mapping[str, str]  # each template and question form, normalized -> its relation's id

    @classmethod
    def from_json(cls, raw: dict) -> Relations:
        """Relations as the data file writes them; refuses a form filed under two relations (its
        corrections could not be told apart) and a kind or a group member it does not know."""
        by_id = {r["id"]: Relation(r["id"], r["name"], tuple(r["kinds"]) if "kinds" in r else (r["kind"],),
                                   tuple(r["templates"]), tuple(r["asks"]), tuple(r["questions"]))
                 for r in raw["relations"]}
        forms: dict[str, str] = {}
        for relation in by_id.values():
            if not relation.kinds or set(relation.kinds) - set(KINDS):
                raise ValueError(f"{relation.id}: kinds {relation.kinds} are not among {KINDS}")
            if stray := set(relation.asks) - set(relation.templates):
                raise ValueError(f"{relation.id}: asks {sorted(stray)}, which are not its templates")
            for form in (*relation.templates, *relation.questions):
                if forms.setdefault(normalized(form), relation.id) != relation.id:
                    raise ValueError(f"{form!r} is a form of both {forms[normalized(form)]} and {relation.id}")
        groups = tuple(frozenset(group) for group in raw["same_question"])
        if unknown := set().union(*groups) - set(by_id):
            raise ValueError(f"same_question names unknown relations {sorted(unknown)}")
        return cls(by_id, groups, forms)

    def asking_as(self, relation_id: str) -> frozenset[str]:
        """The relation and every relation that asks the same question in other words."""
        return frozenset({relation_id}).union(*(group for group in self.same_question if relation_id in group))


@functools.cache
def load_relations(root: Path) -> Relations:
    """The relations of a data folder (`policies.probes.data_dir()`), read once per process."""
    return Relations.from_json(json.loads((root / "relations" / "relations.json").read_text(encoding="utf-8")))


def normalized(text: str) -> str:
    """Case and runs of whitespace aside: how a prompt or a subject is compared."""
    return " ".join(text.split()).casefold()


def relation_of(correction: Correction, relations: Relations) -> Relation | None:
    """The relation whose template the correction's prompt is, its subject taken out; None without a
    subject, when the prompt does not name it, or when no template matches."""
    if not correction.subject or not normalized(correction.subject):
        return None
    subject, prompt = normalized(correction.subject), normalized(correction.prompt)
    if subject not in prompt:
        return None
    found = relations.forms.get(prompt.replace(subject, "{}"))
    return relations.by_id[found] if found else None


def other_questions(correction: Correction, relations: Relations, per_correction: int, rng: random.Random,
                    held: Iterable[str] = ()) -> list[OtherQuestion]:
    """Up to `per_correction` questions about the correction's subject, each of another relation
    that asks about the subject's kind (its relation's first), as one of that relation's cloze forms
    or question forms, drawn with `rng`. None when its relation is not known. `held`: relations the
    memory also holds corrections of about this subject; asking them is no other question."""
    relation = relation_of(correction, relations)
    if relation is None:
        return []
    skip = frozenset().union(*(relations.asking_as(r) for r in (relation.id, *held)))
    candidates = [r for r in relations.by_id.values() if relation.kinds[0] in r.kinds and r.id not in skip]
    chosen = rng.sample(candidates, min(per_correction, len(candidates)))
    return [OtherQuestion(correction.id, r.id, rng.choice(r.asks + r.questions).replace("{}", correction.subject))
            for r in chosen]


def questions_about(corrections: list[Correction], relations: Relations, per_correction: int,
                    seed: int) -> list[OtherQuestion]:
    """Other questions about each correction's subject, none of a relation another of the
    corrections holds about it. Each correction draws with its own generator (seeded by `seed` and
    its id), so its questions do not change with the set it is measured in, nor when its subject
    field is later dropped."""
    held: dict[str, set[str]] = {}
    for c in corrections:
        if (relation := relation_of(c, relations)) is not None:
            held.setdefault(normalized(c.subject or ""), set()).add(relation.id)
    return [q for c in corrections
            for q in other_questions(c, relations, per_correction, random.Random(f"{seed}:{c.id}"),
                                     held.get(normalized(c.subject or ""), ()))]


def half(subject: str) -> str:
    """"tuning" or "measuring", from a hash of the normalized subject: every question about one
    subject falls in one half, whatever its record or wording."""
    return HALVES[hashlib.sha256(normalized(subject).encode("utf-8")).digest()[0] % 2]
