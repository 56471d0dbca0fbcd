"""The gate's policy file: read once at start; every mistake names its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from policies.gate import check, decide
from policies.policy import DEFAULT_POLICY, PolicyError, Threshold, load_policy

VALID = """checks:
  reliability: {accept: 0.9, hold: 0.6}
  generalization: {accept: 0.5, hold: 0.0}
  locality: {accept: 0.92, hold: 0.88}
  retention: {accept: 0.95, hold: 0.85}
  ppl_drawdown: {accept: 0.02, hold: 0.05}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_the_default_policy_loads_with_every_check() -> None:
    policy = load_policy()
    assert policy.source == str(DEFAULT_POLICY)
    assert [t.check for t in policy.thresholds] == ["reliability", "generalization", "locality", "retention", "ppl_drawdown",
                                                    "repetition", "leaks", "other_leak"]
    assert not any(policy.threshold(name).higher_is_better for name in ("ppl_drawdown", "repetition", "leaks", "other_leak"))


def test_a_policy_without_the_generation_checks_does_not_have_them(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("\n".join(line for line in DEFAULT_POLICY.read_text().splitlines()
                              if not line.lstrip().startswith(("repetition:", "leaks:", "other_leak:"))))
    policy = load_policy(path)
    assert not any(policy.checks(name) for name in ("repetition", "leaks", "other_leak")) and policy.checks("locality")


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"key checks\.locality\.acept: unknown key"):
        load_policy(write(tmp_path, VALID.replace("locality: {accept", "locality: {acept: 0.9, accept")))


def test_a_threshold_out_of_range_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"key checks\.retention\.accept"):
        load_policy(write(tmp_path, VALID.replace("retention: {accept: 0.95", "retention: {accept: 1.5")))


def test_a_hold_threshold_stricter_than_accept_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"checks\.locality.*hold \(0\.99\) must not be above accept"):
        load_policy(write(tmp_path, VALID.replace("hold: 0.88", "hold: 0.99")))


def test_a_missing_check_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"key checks\.ppl_drawdown: missing"):
        load_policy(write(tmp_path, "\n".join(VALID.splitlines()[:-1])))


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "nope.yaml")


MIN = Threshold("locality", accept=0.9, hold=0.8, higher_is_better=True)
MAX = Threshold("ppl_drawdown", accept=0.02, hold=0.05, higher_is_better=False)


@pytest.mark.parametrize(("threshold", "value", "outcome"), [
    (MIN, 0.95, "pass"), (MIN, 0.9, "pass"), (MIN, 0.85, "hold"), (MIN, 0.5, "fail"),
    (MAX, 0.01, "pass"), (MAX, 0.03, "hold"), (MAX, 0.2, "fail"), (MIN, None, "skipped"),
])
def test_a_value_passes_holds_or_fails_against_its_thresholds(threshold, value, outcome) -> None:
    assert check(threshold.check, value, 10, threshold).outcome == outcome


def test_any_failure_rejects_and_any_hold_band_holds() -> None:
    passing, holding, failing = check("a", 0.95, 1, MIN), check("b", 0.85, 1, MIN), check("c", 0.1, 1, MIN)
    assert decide([passing, check("d", None, 0, MIN)]) == "accepted"
    assert decide([passing, holding]) == "held"
    assert decide([holding, failing]) == "rejected"
