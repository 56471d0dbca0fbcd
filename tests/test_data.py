"""The repository stands alone: the editing data it needs is inside it, as its README lists it."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies.probes import BUNDLED_DATA, DataNotFound, data_dir

REPO = Path(__file__).resolve().parents[1]


def listed_files() -> dict[str, str]:
    """path -> sha256, as the data README's table gives them."""
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", (BUNDLED_DATA / "README.md").read_text(), re.M)
    return dict(rows)


def test_every_bundled_data_file_is_listed_with_its_hash() -> None:
    on_disk = {str(p.relative_to(BUNDLED_DATA)) for p in BUNDLED_DATA.rglob("*") if p.is_file() and p.name != "README.md"}
    assert on_disk == set(listed_files())
    for name, digest in listed_files().items():
        assert hashlib.sha256((BUNDLED_DATA / name).read_bytes()).hexdigest() == digest, name


def test_without_mendd_data_the_bundled_data_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MENDD_DATA", raising=False)
    assert data_dir() == BUNDLED_DATA


def test_a_mendd_data_folder_without_the_data_is_named_in_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_DATA", str(tmp_path))
    with pytest.raises(DataNotFound, match=re.escape(f"MENDD_DATA={tmp_path}")):
        data_dir()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed repository cloned into an empty folder: no ../shared beside it, no MENDD_DATA."""
    target = tmp_path_factory.mktemp("fresh") / "mendd"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(target)], check=True, timeout=120)
    return target


def in_clone(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The clone's packages come first on the path, so its code and its data are what runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDD_")}
    env["PYTHONPATH"] = str(clone)
    return subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600)


def test_a_fresh_clone_reads_its_own_data(clone: Path) -> None:
    result = in_clone(clone, "-c", "from policies.probes import data_dir; print(data_dir())")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == clone / "policies" / "data"


def test_mendd_init_works_in_a_fresh_clone(clone: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = in_clone(clone, "-m", "daemon", "--home", str(home), "init", "--model", "tiny-llama")
    assert result.returncode == 0, result.stderr
    assert (home / "suites" / "suites.json").is_file()
