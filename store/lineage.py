"""Which corrections a version's weights carry, from the versions' metadata alone.

A version's model is the base plus the deltas of its edits: an edit adds its corrections to its
parent's, a revert removes one from its parent's, and a rollback serves an earlier version's model
again, so it carries exactly that version's corrections.
"""

from __future__ import annotations

from store.versions import Version


def in_effect(versions: list[Version], tag: str) -> dict[str, str]:
    """Correction id -> the tag of the version that applied it, for every correction ``tag`` carries."""
    carried: dict[str, str] = {}
    for step in steps(versions, tag):
        for correction in step.corrections:
            if step.kind == "edit":
                carried[correction] = step.tag
            else:
                carried.pop(correction, None)
    return carried


def applied_twice(versions: list[Version], tag: str) -> list[str]:
    """Corrections that an edit in ``tag``'s lineage applied while an earlier edit's change for them
    was still in the weights: their change is in the model twice."""
    carried: set[str] = set()
    twice: list[str] = []
    for step in steps(versions, tag):
        for correction in step.corrections:
            if step.kind != "edit":
                carried.discard(correction)
            elif correction in carried:
                twice.append(f"{correction} (again by {step.tag})")
            else:
                carried.add(correction)
    return twice


def steps(versions: list[Version], tag: str) -> list[Version]:
    """The edits and reverts whose changes make up ``tag``'s model, oldest first."""
    by_tag = {version.tag: version for version in versions}
    found: list[Version] = []
    current = by_tag[tag]
    # Walk back to the base, skipping over each rollback to the version it restores.
    while current.kind != "base":
        if current.kind == "rollback":
            current = by_tag[current.restores]
            continue
        found.append(current)
        current = by_tag[current.parent]
    return found[::-1]
