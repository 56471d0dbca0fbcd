"""`mendd init`, `versions`, `rollback` and `revert` as an operator runs them: real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.commits import commit_delta
from daemon.home import Home
from decision_helpers import ACCEPT_ALL, make_decision_home, policy
from home_copies import copy_home
from store.versions import Version
from store_helpers import FACTS, mend_delta, open_home, store_is_clean
from test_cli import mendd


def history(home: Home) -> list[Version]:
    """The store's versions, read in-process (`mendd versions` itself is tested above)."""
    versions = open_home(home)
    try:
        return versions.store.versions()
    finally:
        versions.close()


@pytest.fixture(scope="module")
def decided(tmp_path_factory, data_root: Path) -> Path:
    """A home with pinned suites and a policy that accepts anything, whose v0001 applied c1 and
    v0002 applied c2 (received through the ledger, as every correction is)."""
    home = make_decision_home(tmp_path_factory.mktemp("decided") / "home", ACCEPT_ALL, data_root)
    versions = open_home(home)
    for fact in FACTS[:2]:
        versions.ledger.receive("api", fact.id, {"prompt": fact.prompt, "target_new": fact.target_new})
        commit_delta(versions, mend_delta([fact]), run_id=f"run-{fact.id}", figures={"locality": 1.0})
    versions.close()
    return home.root


@pytest.fixture
def home(decided: Path, tmp_path: Path) -> Home:
    """This test's own copy of the decided home."""
    return Home(copy_home(decided, tmp_path / "home"))


def test_a_new_home_lists_v0000_as_its_only_version(tiny_home: Path) -> None:
    listed = json.loads(mendd("--home", str(tiny_home), "versions", "--json").stdout)
    assert listed["head"] == "v0000" and [v["kind"] for v in listed["versions"]] == ["base"]


def test_init_with_an_unloadable_model_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    result = mendd("--home", str(root), "init", "--model", "hf:/no/such/folder")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (root / "mendd.yaml").exists()


def test_versions_shows_tag_date_parent_corrections_run_and_figures(home: Home) -> None:
    lines = mendd("--home", str(home.root), "versions").stdout.splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("v0002  ") and "parent v0001" in lines[2] and "applied c2" in lines[2]
    assert "run run-c2" in lines[2] and "locality=1" in lines[2]
    listed = json.loads(mendd("--home", str(home.root), "versions", "--json").stdout)["versions"]
    assert listed[1]["corrections"] == ["c1"] and listed[1]["run_id"] == "run-c1"


def test_rollback_commits_a_new_version_and_reports_rolled_back_corrections(home: Home) -> None:
    result = mendd("--home", str(home.root), "rollback", "v0001")
    assert result.returncode == 0, result.stderr
    assert "v0003: serving the model of v0001 again" in result.stdout
    assert "c2: applied -> rolled_back" in result.stdout
    assert store_is_clean(home.store_dir)


def test_revert_is_judged_by_the_gate_and_commits_a_version_without_the_correction(home: Home) -> None:
    result = mendd("--home", str(home.root), "revert", "c1")
    assert result.returncode == 0, result.stderr
    assert "v0003: reverted c1 (gate: accepted; run " in result.stdout and "c1: applied -> rolled_back" in result.stdout
    made = history(home)[-1]
    assert made.kind == "revert" and made.run_id and "locality" in made.figures


def test_a_revert_the_gate_rejects_changes_nothing_until_forced(home: Home) -> None:
    (home.root / "policy.yaml").write_text(policy(locality=(1.0, 1.0), ppl=(0.0, 0.0)))
    refused = mendd("--home", str(home.root), "revert", "c1")
    assert refused.returncode == 1 and "not reverted: the gate rejected" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert history(home)[-1].tag == "v0002"
    assert store_is_clean(home.store_dir)
    forced = mendd("--home", str(home.root), "revert", "c1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "v0003: reverted c1 (gate: rejected, forced over a rejected decision" in forced.stdout
    made = history(home)[-1]
    assert made.tag == "v0003" and "--force over a rejected decision" in made.reason


@pytest.mark.parametrize(("args", "message"), [
    (["rollback", "v0099"], "no version v0099"),
    (["rollback", "v0002"], "already the current version"),
    (["revert", "c3"], "not in the weights"),
    (["revert", "missing-id"], "no correction with this id"),
])
def test_bad_version_or_correction_exits_2_and_changes_nothing(home: Home, args: list[str], message: str) -> None:
    result = mendd("--home", str(home.root), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert history(home)[-1].tag == "v0002"
    assert store_is_clean(home.store_dir)


def test_versions_on_a_home_without_a_store_says_to_run_init(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "mendd.yaml").write_text("model: tiny-llama\n")
    result = mendd("--home", str(root), "versions")
    assert result.returncode == 2 and "init --force" in result.stderr
