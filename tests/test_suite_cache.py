"""Pinned suites are cached by what they depend on: a second home of the same model copies them,
and other weights or other data are pinned anew."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from daemon.home import Home
from daemon.provision import provision_home
from daemon.suite_files import pinning_key
from store.models import load_model


def test_a_second_home_of_the_same_model_copies_the_pinned_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  data_root: Path) -> None:
    monkeypatch.setenv("MENDD_CACHE", str(tmp_path / "cache"))
    loaded = load_model("tiny-llama")
    first = provision_home(Home(tmp_path / "a"), "tiny-llama", loaded, data_root=data_root)
    [entry] = (tmp_path / "cache" / "suites").iterdir()
    second = provision_home(Home(tmp_path / "b"), "tiny-llama", loaded, data_root=data_root)
    for path in ("suites_path", "keys_path"):
        assert getattr(second, path).read_bytes() == getattr(first, path).read_bytes() == (entry / getattr(first, path).name).read_bytes()
    assert list((tmp_path / "cache" / "suites").iterdir()) == [entry]


def test_other_weights_are_pinned_under_another_key(tiny, data_root: Path) -> None:
    before = pinning_key(tiny, "tiny-llama", "v0000", data_root, None)
    weight = tiny.model.get_output_embeddings().weight
    kept = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = kept + 1.0
    try:
        assert pinning_key(tiny, "tiny-llama", "v0000", data_root, None) != before
    finally:
        with torch.no_grad():
            weight[0, 0] = kept  # the session's tiny model is shared: restore it exactly
    assert pinning_key(tiny, "tiny-llama", "v0000", data_root, None) == before


def test_other_data_is_pinned_under_another_key(tiny, data_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "data"
    shutil.copytree(data_root, other, ignore=shutil.ignore_patterns("counterfact", "mquake"))
    assert pinning_key(tiny, "tiny-llama", "v0000", other, None) == pinning_key(tiny, "tiny-llama", "v0000", data_root, None)
    with open(other / "wikitext2" / "wiki.test.raw", "a", encoding="utf-8") as text:
        text.write("One more line.\r\n")
    assert pinning_key(tiny, "tiny-llama", "v0000", other, None) != pinning_key(tiny, "tiny-llama", "v0000", data_root, None)


def test_a_routed_home_is_pinned_under_another_key_than_a_weights_home(tiny, data_root: Path) -> None:
    assert pinning_key(tiny, "tiny-llama", "v0000", data_root, 1) != pinning_key(tiny, "tiny-llama", "v0000", data_root, None)
