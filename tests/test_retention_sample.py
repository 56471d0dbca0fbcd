"""Which earlier corrections a decision checks: a bounded, seeded sample that keeps the ones most at risk."""
from __future__ import annotations

from editors.types import Correction
from policies.suites import Carried, retention_sample


def _applied(n: int) -> list[Carried]:
    return [Carried.of(Correction(f"c{i}", f"Subject {i} plays for", f"Team {i}", subject=f"Subject {i}")) for i in range(n)]


def test_with_few_applied_corrections_every_one_is_checked() -> None:
    applied = _applied(50)
    assert retention_sample(applied, [], recent=30, older=30) == applied


def test_the_sample_stays_bounded_however_many_are_applied() -> None:
    assert len(retention_sample(_applied(10_000), [], recent=100, older=100)) == 200


def test_the_latest_applied_corrections_are_always_checked() -> None:
    applied = _applied(1000)
    assert applied[-100:] == retention_sample(applied, [], recent=100, older=50)[-100:]


def test_every_correction_about_a_new_correction_s_subject_is_checked() -> None:
    applied = _applied(1000)
    new = [Correction("n", "subject 7's nationality is", "French", subject="subject 7")]
    assert applied[7] in retention_sample(applied, new, recent=10, older=10)


def test_a_correction_that_names_the_subject_by_an_alias_checks_those_about_it() -> None:
    applied = _applied(1000)
    new = [Correction("n", "S7 plays for", "Arsenal", subject="S7", aliases=("Subject 7",))]
    assert applied[7] in retention_sample(applied, new, recent=10, older=10)
    assert applied[8] not in retention_sample(applied, new, recent=10, older=0)


def test_the_same_batch_draws_the_same_sample_and_another_batch_another() -> None:
    applied = _applied(1000)
    batch = [Correction("n1", "x", "y"), Correction("n2", "x", "y")]
    again = list(reversed(batch))
    other = [Correction("n3", "x", "y")]
    assert retention_sample(applied, batch, 10, 50) == retention_sample(applied, again, 10, 50)
    assert retention_sample(applied, batch, 10, 50) != retention_sample(applied, other, 10, 50)


def test_the_sample_keeps_the_order_in_which_corrections_were_applied() -> None:
    applied = _applied(1000)
    sample = retention_sample(applied, [], recent=20, older=80)
    assert sample == sorted(sample, key=applied.index)
