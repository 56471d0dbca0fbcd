"""Which corrections a version's weights carry, from the versions' metadata alone.

A version's model is the base plus the deltas of its edits: an edit adds its corrections to its
parent's, a revert removes one from its parent's, and a rollback serves an earlier version's model
again, so it carries exactly that version's corrections.
"""

from __future__ import annotations

from store.versions import Version


def in_effect(versions: list[Version], tag: str) -> dict[str, str]:
    """Correction id -> the tag of the version that applied it, for every correction ``tag`` carries."""
    by_tag = {version.tag: version for version in versions}
    steps: list[Version] = []
    current = by_tag[tag]
    # Walk back to the base, skipping over each rollback to the version it restores.
    while current.kind != "base":
        if current.kind == "rollback":
            current = by_tag[current.restores]
            continue
        steps.append(current)
        current = by_tag[current.parent]
    carried: dict[str, str] = {}
    for step in reversed(steps):
        for correction in step.corrections:
            if step.kind == "edit":
                carried[correction] = step.tag
            else:
                carried.pop(correction, None)
    return carried
