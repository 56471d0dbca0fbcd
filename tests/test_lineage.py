"""Which corrections each version carries, from version metadata alone."""

from __future__ import annotations

from datetime import datetime, timezone

from store.lineage import applied_twice, in_effect
from store.versions import Version


def v(tag: str, kind: str, parent: str | None, corrections: tuple[str, ...] = (), restores: str | None = None) -> Version:
    return Version(tag=tag, sha=tag, parent=parent, kind=kind, created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
                   corrections=corrections, run_id=None, restores=restores, reason="", figures={}, model_md5=tag)


HISTORY = [
    v("v0000", "base", None),
    v("v0001", "edit", "v0000", ("a", "b")),
    v("v0002", "edit", "v0001", ("c",)),
    v("v0003", "revert", "v0002", ("a",)),
    v("v0004", "rollback", "v0003", restores="v0001"),
    v("v0005", "edit", "v0004", ("d",)),
    v("v0006", "rollback", "v0005", restores="v0003"),
]


def test_edits_add_their_corrections_at_the_version_that_applied_them() -> None:
    assert in_effect(HISTORY, "v0002") == {"a": "v0001", "b": "v0001", "c": "v0002"}


def test_a_revert_removes_only_its_correction() -> None:
    assert in_effect(HISTORY, "v0003") == {"b": "v0001", "c": "v0002"}


def test_a_rollback_carries_exactly_what_the_restored_version_carried() -> None:
    assert in_effect(HISTORY, "v0004") == {"a": "v0001", "b": "v0001"}
    assert in_effect(HISTORY, "v0005") == {"a": "v0001", "b": "v0001", "d": "v0005"}
    assert in_effect(HISTORY, "v0006") == {"b": "v0001", "c": "v0002"}


def test_the_base_carries_nothing() -> None:
    assert in_effect(HISTORY, "v0000") == {}


def test_a_correction_applied_by_two_edits_is_applied_twice() -> None:
    history = [v("v0000", "base", None), v("v0001", "edit", "v0000", ("a",)), v("v0002", "edit", "v0001", ("a", "b"))]
    assert applied_twice(history, "v0002") == ["a (again by v0002)"]


def test_a_correction_reverted_then_applied_again_or_restored_by_a_rollback_is_applied_once() -> None:
    history = [*HISTORY, v("v0007", "edit", "v0006", ("a",))]  # v0006 carries b and c; a was reverted at v0003
    assert [applied_twice(history, version.tag) for version in history] == [[]] * len(history)
