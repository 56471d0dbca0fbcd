from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.config import MenddConfig, load_config, render_default_config
from daemon.home import Home, HomeError, init_home, resolve_home


def test_every_location_lives_under_the_root(tmp_path: Path) -> None:
    home = Home(tmp_path)
    for path in (home.config_path, home.state_dir, home.store_dir, home.mlflow_artifacts, home.lock_path):
        assert path.is_relative_to(tmp_path)
    assert home.mlflow_db_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert home.ledger_url == f"sqlite:///{tmp_path}/state/ledger.db"


def home_locations(home: Home) -> set[str]:
    """Every file and folder the Home names, relative to its root (sqlite URIs as their files)."""
    named = (getattr(home, attr) for attr, value in vars(Home).items() if isinstance(value, property))
    paths = (Path(p.removeprefix("sqlite:///")) if isinstance(p, str) else p for p in named)
    return {str(p.relative_to(home.root)) for p in paths}


def readme_home_layout() -> set[str]:
    """The first column of the README's `<home>/` block, without trailing slashes."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("```\n<home>/\n", 1)[1].split("```", 1)[0]
    return {line.split()[0].rstrip("/") for line in block.splitlines()}


def test_the_readme_home_layout_lists_every_location_the_home_names() -> None:
    layout = readme_home_layout()
    for location in home_locations(Home(Path("/h"))):
        # A folder is listed through what lies in it (state/ through state/ledger.db).
        assert location in layout or any(entry.startswith(location + "/") for entry in layout), location


def test_the_readme_home_layout_lists_nothing_the_home_does_not_name() -> None:
    assert readme_home_layout() <= home_locations(Home(Path("/h")))


def test_relative_root_is_made_absolute_so_sqlite_uris_do_not_depend_on_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    home = Home(Path("h"))
    assert home.root == tmp_path / "h"
    assert home.ledger_url.startswith("sqlite:////")


def test_cli_value_wins_over_mendd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_HOME", str(tmp_path / "from-env"))
    assert resolve_home(tmp_path / "from-cli").root == tmp_path / "from-cli"


def test_mendd_home_is_used_without_cli_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_HOME", str(tmp_path / "from-env"))
    assert resolve_home(None).root == tmp_path / "from-env"


def test_default_home_is_dot_mendd_in_the_user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home(None).root == tmp_path / ".mendd"


def test_init_creates_the_folders_and_the_config(tmp_path: Path) -> None:
    home = init_home(Home(tmp_path / "h"), "tiny-llama")
    for folder in (home.state_dir, home.store_dir, home.mlflow_artifacts):
        assert folder.is_dir()
    assert load_config(home).model == "tiny-llama"


def test_init_refuses_to_overwrite_an_existing_config(tmp_path: Path) -> None:
    home = init_home(Home(tmp_path), "tiny-llama")
    home.config_path.write_text("batch_size: 3\n")
    with pytest.raises(HomeError, match="--force"):
        init_home(home, "tiny-llama")
    assert home.config_path.read_text() == "batch_size: 3\n"


def test_init_with_force_rewrites_the_config(tmp_path: Path) -> None:
    home = init_home(Home(tmp_path), "tiny-llama")
    home.config_path.write_text("batch_size: 3\n")
    init_home(home, "smollm2-135m", force=True)
    assert load_config(home).batch_size == 10  # smollm2-135m's profile, not the 3 written by hand
    assert not list(tmp_path.glob("*.tmp"))


def test_default_config_equals_the_built_in_defaults(tmp_path: Path) -> None:
    written = yaml.safe_load(render_default_config("hf:/models/x"))
    expected = MenddConfig(model="hf:/models/x").model_dump(mode="json")
    assert written == expected


def test_default_config_comments_every_key_with_allowed_values_and_env_var() -> None:
    lines = render_default_config("tiny-llama").splitlines()
    keys = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    sections = {"editor:", "cycle:", "caches:", "http:", "store:", "mlflow:"}
    for i in keys:
        above = lines[i - 1].strip()
        if lines[i].strip() in sections:
            assert above.startswith("#"), lines[i]
        else:
            assert above.startswith("# Allowed:") and "Environment: MENDD_" in above, lines[i]
