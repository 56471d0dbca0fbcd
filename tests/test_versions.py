"""The git+DVC version store on tiny-llama: real git, real DVC, real MEND deltas, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daemon.commits import commit_change, commit_delta, revert_change, rollback
from daemon.home import Home
from daemon.versioning import load_served_model, served_version
from store.checkpoint import INDEX, read_tensors
from store.errors import DirtyStoreError, MissingObjectsError, StoreError, UnknownCorrectionError, UnknownVersionError
from store.ledger_schema import CorrectionStatus
from store.models import load_model
from store.versions import META_PREFIX, MODEL_DVC, Change, VersionStore, _message, _metadata
from store_helpers import FACTS, digests, make_home, mend_delta, open_home, store_is_clean, tool


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "home")


@pytest.fixture(scope="module")
def deltas():
    """One real MEND delta per fact, computed once."""
    return {fact.id: mend_delta([fact]) for fact in FACTS}


def status_of(home: Home, correction_id: str) -> tuple[CorrectionStatus, str | None]:
    versions = open_home(home)
    try:
        found = versions.ledger.correction(correction_id)
        return found.status, found.version
    finally:
        versions.close()


def weights(store_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    return read_tensors(store_dir / "model", names)


def test_init_commits_the_base_model_as_v0000_one_file_per_tensor(home: Home) -> None:
    store = VersionStore(home.store_dir)
    (base,) = store.versions()
    assert base.tag == "v0000" and base.kind == "base" and base.parent is None
    assert tool(home.store_dir, "git", "tag").stdout.split() == ["v0000"]
    tiny = load_model("tiny-llama").model
    unique = {name for name in tiny.state_dict() if name != "lm_head.weight"}  # tied to the embedding
    assert {p.name for p in (home.store_dir / "model").glob("*.safetensors")} == {f"{n}.safetensors" for n in unique}
    assert store_is_clean(home.store_dir)
    config = (home.store_dir / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "type = copy" in config


def test_the_home_holds_all_dvc_state_so_it_can_be_moved_or_deleted_as_a_unit(tmp_path: Path) -> None:
    outside = Path("/var/tmp/dvc/repo")
    before = set(outside.iterdir()) if outside.is_dir() else set()
    home = make_home(tmp_path / "home")
    assert (home.store_dir / ".dvc" / "tmp" / "site").is_dir()
    assert (set(outside.iterdir()) if outside.is_dir() else set()) == before


def test_every_version_loads_with_transformers_as_a_sharded_checkpoint(home: Home) -> None:
    loaded = load_model(f"hf:{home.store_dir / 'model'}")
    reference = load_model("tiny-llama").model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[name], tensor) for name, tensor in reference.items())
    assert json.loads((home.store_dir / "model" / INDEX).read_text())["weight_map"]


def test_commit_changes_only_the_edited_tensor_files_and_tags_a_named_version(home: Home, deltas) -> None:
    before = digests(home.store_dir / "model")
    versions = open_home(home)
    version = commit_delta(versions, deltas["c1"], run_id="run-abc", figures={"locality": 0.98})
    versions.close()
    after = digests(home.store_dir / "model")
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {f"{name}.safetensors" for name in deltas["c1"].tensors()}
    assert version.tag == "v0001" and version.parent == "v0000" and version.corrections == ("c1",)
    message = tool(home.store_dir, "git", "log", "-1", "--format=%B", "v0001").stdout
    assert "c1" in message and "run-abc" in message
    assert store_is_clean(home.store_dir)
    assert status_of(home, "c1") == (CorrectionStatus.applied, "v0001")


def test_commit_weights_are_the_head_plus_the_delta(home: Home, deltas) -> None:
    names = list(deltas["c1"].tensors())
    base = weights(home.store_dir, names)
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id=None, figures={})
    versions.close()
    for name, tensor in weights(home.store_dir, names).items():
        assert torch.equal(tensor, base[name] + deltas["c1"].tensors()[name])


def test_a_correction_the_weights_carry_is_never_applied_again(home: Home, deltas) -> None:
    versions = open_home(home)
    try:
        commit_delta(versions, deltas["c1"], run_id="r1", figures={})
        with pytest.raises(StoreError, match=r"already applied: 'c1' \(at v0001\)"):
            commit_delta(versions, deltas["c1"], run_id="r1-again", figures={})
        assert versions.store.head().tag == "v0001"
    finally:
        versions.close()


def test_rollback_is_a_new_commit_equal_to_the_old_version_and_rolls_corrections_back(home: Home, deltas) -> None:
    base = digests(home.store_dir / "model")
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    commit_delta(versions, deltas["c2"], run_id="r2", figures={})
    made = rollback(versions, "v0000", reason="test")
    versions.close()
    assert (made.tag, made.kind, made.restores, made.parent) == ("v0003", "rollback", "v0000", "v0002")
    assert digests(home.store_dir / "model") == base
    assert [v.tag for v in VersionStore(home.store_dir).versions()] == ["v0000", "v0001", "v0002", "v0003"]
    assert status_of(home, "c1")[0] == status_of(home, "c2")[0] == CorrectionStatus.rolled_back
    assert store_is_clean(home.store_dir)


def test_rolling_forward_to_a_version_restores_the_corrections_it_carries(home: Home, deltas) -> None:
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    commit_delta(versions, deltas["c2"], run_id="r2", figures={})
    rollback(versions, "v0001", reason="drop c2")
    assert status_of(home, "c2") == (CorrectionStatus.rolled_back, "v0002")
    rollback(versions, "v0002", reason="bring c2 back")
    versions.close()
    assert status_of(home, "c1") == (CorrectionStatus.applied, "v0001")
    assert status_of(home, "c2") == (CorrectionStatus.applied, "v0002")


def test_operator_git_and_dvc_checkout_restores_v0001_exactly_and_the_service_adopts_it(home: Home, deltas) -> None:
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    at_v0001 = digests(home.store_dir / "model")
    served = commit_delta(versions, deltas["c2"], run_id="r2", figures={})
    assert tool(home.store_dir, "git", "checkout", "v0001", "--", MODEL_DVC).returncode == 0
    checkout = tool(home.store_dir, "dvc", "checkout")
    assert checkout.returncode == 0, checkout.stderr
    assert digests(home.store_dir / "model") == at_v0001
    current = served_version(versions, served)
    reloaded = load_served_model(versions).model.state_dict()
    versions.close()
    assert current is not None and (current.tag, current.kind, current.restores) == ("v0003", "rollback", "v0001")
    base = load_model("tiny-llama").model.state_dict()
    for name, update in deltas["c1"].tensors().items():
        assert torch.equal(reloaded[name], base[name] + update)
    assert status_of(home, "c2")[0] == CorrectionStatus.rolled_back
    assert status_of(home, "c1") == (CorrectionStatus.applied, "v0001")
    assert store_is_clean(home.store_dir) and digests(home.store_dir / "model") == at_v0001
    events = open_home(home).ledger.events()
    assert [e.kind for e in events] == ["operator-checkout", "reload"] and "v0001" in events[0].detail


def test_service_reloads_after_another_process_rolled_back(home: Home, deltas) -> None:
    service = open_home(home)
    served = commit_delta(service, deltas["c1"], run_id="r1", figures={})
    assert served_version(service, served) is None
    operator = open_home(home)
    rollback(operator, "v0000", reason="by the CLI")
    operator.close()
    current = served_version(service, served)
    service.close()
    assert (current.tag, current.restores) == ("v0002", "v0000")


def test_service_waits_while_an_operator_checkout_is_half_done(home: Home, deltas) -> None:
    versions = open_home(home)
    served = commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    tool(home.store_dir, "git", "checkout", "v0000", "--", MODEL_DVC)  # dvc checkout not run yet
    assert served_version(versions, served) is None
    tool(home.store_dir, "dvc", "checkout")
    assert served_version(versions, served).restores == "v0000"
    versions.close()


def test_revert_subtracts_one_correction_exactly_and_keeps_later_ones(home: Home, deltas) -> None:
    names = list(deltas["c1"].tensors())
    base = weights(home.store_dir, names)
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    commit_delta(versions, deltas["c2"], run_id="r2", figures={})
    made = commit_change(versions, revert_change(versions, "c1", reason="wrong fact"))
    versions.close()
    assert (made.tag, made.kind, made.corrections) == ("v0003", "revert", ("c1",))
    expected = {name: base[name] + deltas["c2"].tensors()[name] for name in names}
    for name, tensor in weights(home.store_dir, names).items():
        # Equal up to float32 rounding of (a + b) - a; the factors themselves are stored exactly.
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6)
        assert not torch.equal(tensor, base[name])
    assert status_of(home, "c1") == (CorrectionStatus.rolled_back, "v0001")
    assert status_of(home, "c2") == (CorrectionStatus.applied, "v0002")


def test_stored_factors_rebuild_the_delta_bit_for_bit(home: Home, deltas) -> None:
    from daemon.stored_form import share_from_stored

    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    (stored,) = versions.store.shares("v0001")
    versions.close()
    rebuilt = share_from_stored(stored).tensors()
    original = deltas["c1"].shares[0].tensors()
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[name], original[name]) for name in original)


def test_factors_rounded_for_storage_are_kept_in_bfloat16_and_rebuild_bit_for_bit(home: Home, deltas) -> None:
    from daemon.stored_form import share_from_stored

    rounded = deltas["c1"].rounded(torch.bfloat16)
    versions = open_home(home)
    commit_delta(versions, rounded, run_id="r1", figures={})
    (stored,) = versions.store.shares("v0001")
    versions.close()
    factors = {k: t for k, t in stored.tensors.items() if k.endswith(("/inputs", "/outputs"))}
    assert factors and all(t.dtype == torch.bfloat16 for t in factors.values())
    rebuilt = share_from_stored(stored).tensors()
    original = rounded.shares[0].tensors()
    assert all(torch.equal(rebuilt[name], original[name]) for name in original)


def test_a_versions_factors_are_one_compressed_file_naming_each_shares_corrections(home: Home) -> None:
    two = mend_delta(FACTS[:2])
    versions = open_home(home)
    commit_delta(versions, two, run_id="r1", figures={})
    shares = versions.store.shares("v0001")
    versions.close()
    assert [p.name for p in (home.store_dir / "factors").iterdir() if p.name != "README"] == ["v0001.safetensors.gz"]
    assert [s.correction_ids for s in shares] == [s.correction_ids for s in two.shares]
    assert store_is_clean(home.store_dir)


def test_revert_of_a_correction_not_in_the_weights_fails_and_changes_nothing(home: Home, deltas) -> None:
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    before = digests(home.store_dir / "model")
    with pytest.raises(UnknownCorrectionError, match="'c2'.*pending"):
        revert_change(versions, "c2", reason="x")
    with pytest.raises(UnknownCorrectionError, match="no correction with this id"):
        revert_change(versions, "nope", reason="x")
    assert versions.store.head().tag == "v0001"
    versions.close()
    assert digests(home.store_dir / "model") == before and store_is_clean(home.store_dir)


@pytest.mark.parametrize("tag", ["v0007", "latest", "v1"])
def test_rollback_to_an_unknown_tag_fails_and_changes_nothing(home: Home, tag: str) -> None:
    versions = open_home(home)
    with pytest.raises(UnknownVersionError):
        rollback(versions, tag, reason="x")
    assert [v.tag for v in versions.store.versions()] == ["v0000"]
    versions.close()
    assert store_is_clean(home.store_dir)


def test_a_hand_edited_tensor_makes_the_store_refuse_to_commit(home: Home, deltas) -> None:
    target = home.store_dir / "model" / "model.norm.weight.safetensors"
    edited = target.read_bytes()[:-4] + b"\0\0\0\0"
    target.write_bytes(edited)
    versions = open_home(home)
    with pytest.raises(DirtyStoreError, match="model"):
        commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    with pytest.raises(DirtyStoreError):
        rollback(versions, "v0000", reason="x")
    assert [v.tag for v in versions.store.versions()] == ["v0000"]
    versions.close()
    assert target.read_bytes() == edited


def test_rollback_when_the_cache_lacks_an_object_fails_and_changes_nothing(home: Home, deltas) -> None:
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    now = digests(home.store_dir / "model")
    # The base's copy of an edited tensor exists only in the cache now; lose it.
    base_md5 = versions.store.version("v0000").model_md5
    manifest = json.loads(_cache_path(home, base_md5).read_text())
    edited = f"{next(iter(deltas['c1'].tensors()))}.safetensors"
    _cache_path(home, next(e["md5"] for e in manifest if e["relpath"] == edited)).unlink()
    with pytest.raises(MissingObjectsError, match=edited):
        rollback(versions, "v0000", reason="x")
    assert versions.store.head().tag == "v0001"
    versions.close()
    assert digests(home.store_dir / "model") == now and store_is_clean(home.store_dir)


def test_each_version_is_pushed_to_the_remote_and_fetched_back_when_the_cache_lost_it(tmp_path: Path, deltas) -> None:
    remote = tmp_path / "remote"
    home = make_home(tmp_path / "home", remote=str(remote))
    versions = open_home(home)
    versions.store.push()  # the base, pushed once the remote is known
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    pushed = {p.name for p in remote.rglob("*") if p.is_file()}
    cached = {p.name for p in (home.store_dir / ".dvc" / "cache").rglob("*") if p.is_file()}
    assert cached <= pushed
    base = versions.store.version("v0000")
    manifest = json.loads(_cache_path(home, base.model_md5).read_text())
    edited = {f"{name}.safetensors" for name in deltas["c1"].tensors()}
    for entry in manifest:
        if entry["relpath"] in edited:  # the base's copies, now only in the cache: lose them
            _cache_path(home, entry["md5"]).unlink()
    rollback(versions, "v0000", reason="from the remote")
    versions.close()
    assert store_is_clean(home.store_dir)
    assert VersionStore(home.store_dir).head().model_md5 == base.model_md5


def test_a_tensor_of_the_wrong_shape_is_refused_before_anything_is_written(home: Home) -> None:
    store = VersionStore(home.store_dir)
    with pytest.raises(StoreError, match="model.norm.weight"):
        store.commit(Change("edit", {"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(StoreError, match="no tensors named"):
        store.commit(Change("edit", {"not.a.tensor": torch.zeros(3)}))
    assert store_is_clean(home.store_dir) and [v.tag for v in store.versions()] == ["v0000"]


def _cache_path(home: Home, md5: str) -> Path:
    return home.store_dir / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_an_unreachable_remote_is_recorded_and_the_version_still_commits(tmp_path: Path, deltas) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's folder should be")
    home = make_home(tmp_path / "home", remote=str(blocker / "remote"))
    versions = open_home(home)
    made = commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    events = versions.ledger.events()
    versions.close()
    assert made.tag == "v0001" and store_is_clean(home.store_dir)
    assert [(e.kind, e.version) for e in events] == [("push-failed", "v0001")]


def test_a_store_folder_with_foreign_files_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    loaded = load_model("tiny-llama")
    with pytest.raises(StoreError, match="not empty"):
        VersionStore.create(root, loaded.model, loaded.tokenizer, "tiny-llama")
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


FORGED = META_PREFIX + json.dumps({"tag": "v0099", "parent": "v0000", "kind": "edit", "corrections": ["forged"],
                                    "model_md5": "0" * 32, "reason": "", "figures": {}, "run_id": None})


def _message_of(store_dir: Path, tag: str) -> str:
    return tool(store_dir, "git", "log", "-1", "--format=%B", tag).stdout


def test_a_rollback_reason_can_neither_forge_nor_break_the_history(home: Home, deltas) -> None:
    hostile = f"ok\n{FORGED}\n\x1e\x1f\x07\u2028\x85 end\r\n{FORGED}"
    versions = open_home(home)
    commit_delta(versions, deltas["c1"], run_id="r1", figures={})
    rollback(versions, "v0000", reason=hostile)
    versions.close()
    store = VersionStore(home.store_dir)
    base, _, made = store.versions()
    assert (made.tag, made.kind, made.restores, made.corrections, made.reason) == ("v0002", "rollback", "v0000", (), hostile)
    assert made.model_md5 == base.model_md5 and store.head() == made and store.version("v0002") == made
    lines = _message_of(home.store_dir, "v0002").rstrip("\n").split("\n")
    assert [line for line in lines if line.startswith(META_PREFIX)] == lines[-1:]
    assert all(char.isprintable() for line in lines for char in line)


def test_the_message_carries_any_metadata_exactly_on_its_last_line_and_nothing_else_can_pass_for_it() -> None:
    hostile = ["c1", f"c2\n{FORGED}", "c3\x00\x1e\x1f\x7f", "c4\r\u2028"]
    meta = {"tag": "v0003", "parent": "v0002", "kind": "revert", "corrections": hostile, "run_id": f"r\n{FORGED}",
            "reason": f"why\n{FORGED}", "figures": {"locality": 0.5}, "model_md5": "a" * 32}
    message = _message(meta)
    lines = message.split("\n")
    assert [line for line in lines if line.startswith(META_PREFIX)] == lines[-1:]
    assert all(char.isprintable() for line in lines for char in line)
    assert _metadata(message) == meta


def test_a_commit_refuses_a_correction_id_outside_the_id_rule(home: Home) -> None:
    versions = open_home(home)
    try:
        for bad in (f"c1\n{FORGED}", "c1\x00", "x" * 129):
            with pytest.raises(StoreError, match="correction id"):
                commit_change(versions, Change("edit", {}, corrections=("c2", bad)))
        assert [v.tag for v in versions.store.versions()] == ["v0000"]
    finally:
        versions.close()
    assert store_is_clean(home.store_dir)


def _commit_by_hand(store_dir: Path, message: str) -> None:
    done = tool(store_dir, "git", "commit", "-q", "--allow-empty", "-m", message)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("line", ['{"tag": "v0001"}', "not json", '["v0001"]', "1" + "0" * 5000,
                                  '{"tag": "../v1", "parent": "v0000", "kind": "edit", "model_md5": "ab"}',
                                  '{"tag": "v0001", "parent": "v0000", "kind": "merge", "model_md5": "ab"}',
                                  '{"tag": "v0001", "parent": "v0000", "kind": "edit", "model_md5": "ab", "corrections": "c1"}'])
def test_a_commit_with_an_invalid_metadata_line_is_reported_by_its_sha(home: Home, line: str) -> None:
    _commit_by_hand(home.store_dir, f"v0001: by hand\n\n{META_PREFIX}{line}")
    sha = tool(home.store_dir, "git", "rev-parse", "HEAD").stdout.strip()
    with pytest.raises(StoreError, match=f"{sha[:12]}.*not valid version metadata"):
        VersionStore(home.store_dir).versions()


def test_only_the_last_line_is_metadata_and_separators_in_a_message_do_not_confuse_the_log(home: Home) -> None:
    store = VersionStore(home.store_dir)
    base = store.head()
    _commit_by_hand(home.store_dir, "an operator's note\x1e with \x1f separators")
    true = {"tag": "v0001", "parent": "v0000", "kind": "rollback", "restores": "v0000", "reason": "x",
            "model_md5": base.model_md5}
    # as a store written before ids had a rule could hold it: a raw id that forged a line in the body
    _commit_by_hand(home.store_dir, f"v0001: roll back to v0000\n\nCorrections: x\n{FORGED}\n\n{META_PREFIX}{json.dumps(true)}")
    assert [(v.tag, v.kind, v.corrections, v.model_md5) for v in store.versions()] == [
        ("v0000", "base", (), base.model_md5), ("v0001", "rollback", (), base.model_md5)]
