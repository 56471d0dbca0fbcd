from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from daemon.config import ConfigError, MenddConfig, check_serving, load_config
from daemon.home import Home, init_home
from test_cli import mendd

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def home_with(tmp_path: Path, text: str) -> Home:
    home = Home(tmp_path)
    home.config_path.write_text(text, encoding="utf-8")
    return home


def config_error(home: Home) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(home)
    return str(caught.value)


def test_good_file_is_loaded(tmp_path: Path) -> None:
    home = home_with(
        tmp_path,
        "model: tiny-llama\n"
        "editor: {name: ft, edit_layers: [model.layers.3.mlp.up_proj]}\n"
        "batch_size: 32\n"
        "http: {host: 0.0.0.0, port: 9100, token: s3cret}\n"
        "store: {remote: /srv/dvc}\n"
        "log_level: DEBUG\n",
    )
    config = load_config(home)
    assert config.model == "tiny-llama"
    assert config.editor.name == "ft"
    assert config.editor.edit_layers == ["model.layers.3.mlp.up_proj"]
    assert config.batch_size == 32
    assert (config.http.host, config.http.port) == ("0.0.0.0", 9100)
    assert config.http.token is not None and config.http.token.get_secret_value() == "s3cret"
    assert config.store.remote == "/srv/dvc"
    assert config.log_level == "DEBUG"


def test_empty_file_means_all_defaults(tmp_path: Path) -> None:
    config = load_config(home_with(tmp_path, ""))
    assert (config.model, config.editor.name, config.batch_size, config.http.port) == ("smollm2-135m", "mend", 1, 8742)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = home_with(tmp_path, "batch_size: 20\nhttp: {host: 0.0.0.0, port: 8000}\n")
    monkeypatch.setenv("MENDD_BATCH_SIZE", "5")
    monkeypatch.setenv("MENDD_HTTP__PORT", "9000")
    config = load_config(home)
    assert config.batch_size == 5
    assert config.http.port == 9000
    assert config.http.host == "0.0.0.0"  # the rest of the section still comes from the file


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_BATCH_SIZE", "5")
    assert MenddConfig(batch_size=7).batch_size == 7


def test_mendd_home_variable_is_not_taken_for_a_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_HOME", str(tmp_path))
    assert load_config(home_with(tmp_path, "batch_size: 4\n")).batch_size == 4


def test_mlflow_uri_defaults_to_the_database_in_the_home(tmp_path: Path) -> None:
    home = home_with(tmp_path, "")
    assert load_config(home).mlflow.tracking_uri == home.mlflow_db_uri


def test_relative_editor_and_policy_paths_are_taken_from_the_home(tmp_path: Path) -> None:
    config = load_config(home_with(tmp_path, "editor: {path: editors/mine}\npolicy: strict.yaml\n"))
    assert config.editor.path == tmp_path / "editors/mine"
    assert config.policy == tmp_path / "strict.yaml"


def test_negative_batch_size_names_key_value_bound_and_file(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "batch_size: -3\n"))
    assert "batch_size: -3 is not allowed: must be greater than or equal to 1" in message
    assert str(tmp_path / "mendd.yaml") in message


def test_unknown_editor_name_lists_the_allowed_names(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "editor: {name: rome}\n"))
    assert "editor.name: \"rome\" is not allowed: must be 'mend', 'ft' or 'none'" in message


def test_unknown_key_lists_the_keys_allowed_there(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "http: {prot: 80}\n"))
    assert "http.prot: unknown key (value 80); the keys allowed here are: host, port, token" in message


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "batchsize: 4\n"))
    assert "batchsize: unknown key" in message and "batch_size" in message


def test_bad_port_from_the_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_HTTP__PORT", "70000")
    message = config_error(home_with(tmp_path, ""))
    assert 'http.port: "70000" is not allowed: must be less than or equal to 65535' in message
    assert "environment variable MENDD_HTTP__PORT" in message


def test_non_numeric_port_is_refused(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "http: {port: eighty}\n"))
    assert 'http.port: "eighty" is not allowed: must be a valid integer' in message


def test_every_bad_value_is_reported_at_once(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "batch_size: 0\nlog_level: loud\n"))
    assert "batch_size: 0" in message and 'log_level: "loud"' in message


def test_secret_token_is_not_echoed_in_errors(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "http: {token: [hunter2]}\n"))
    assert "http.token: <hidden>" in message and "hunter2" not in message


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "model: tiny-llama\nhttp:\n  port: [8742\n"))
    assert f"{tmp_path / 'mendd.yaml'}, line 4" in message
    assert "not valid YAML" in message


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    message = config_error(home_with(tmp_path, "- batch_size\n"))
    assert "must be a mapping of keys to values" in message


def test_list_variable_that_is_not_a_json_list_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_EDITOR__EDIT_LAYERS", "not json")
    message = config_error(home_with(tmp_path, ""))
    assert 'editor.edit_layers: "not json" is not allowed: must be a valid list' in message
    assert "environment variable MENDD_EDITOR__EDIT_LAYERS" in message


def test_section_variable_that_is_not_json_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDD_HTTP", "{port: 1")
    message = config_error(home_with(tmp_path, ""))
    assert '"http"' in message and "MENDD_HTTP__PORT" in message


def test_the_service_refuses_to_start_with_the_example_files_placeholder_token(tmp_path: Path) -> None:
    placeholder = re.search(r"^MENDD_HTTP__TOKEN=(.*)$", (DEPLOY / "mendd.env.example").read_text(), re.M).group(1)
    refused = mendd("--home", str(home_with(tmp_path, "").root), "run", env={"MENDD_HTTP__TOKEN": placeholder})
    assert refused.returncode != 0
    assert "http.token: is the placeholder 'change-me'" in refused.stderr
    assert "environment variable MENDD_HTTP__TOKEN" in refused.stderr


def test_the_service_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    refused = mendd("--home", str(home_with(tmp_path, "http: {host: 0.0.0.0}\n").root), "run")
    assert refused.returncode != 0
    assert "http.host: '0.0.0.0' is not a loopback address" in refused.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.2", "::1", "localhost", "LOCALHOST"])
def test_a_loopback_host_may_serve_without_a_token(tmp_path: Path, host: str) -> None:
    check_serving(MenddConfig(http={"host": host}), home_with(tmp_path, ""))


def test_a_host_beyond_loopback_may_serve_with_a_token_of_its_own(tmp_path: Path) -> None:
    check_serving(MenddConfig(http={"host": "0.0.0.0", "token": "s3cret"}), home_with(tmp_path, ""))


def test_missing_config_says_how_to_create_it(tmp_path: Path) -> None:
    message = config_error(Home(tmp_path))
    assert "No configuration" in message and "init" in message


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-1000, max_value=1000))
def test_batch_size_is_accepted_exactly_within_1_to_256(size: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        home = home_with(Path(folder), f"batch_size: {size}\n")
        if 1 <= size <= 256:
            assert load_config(home).batch_size == size
        else:
            with pytest.raises(ConfigError, match=f"batch_size: {size} is not allowed"):
                load_config(home)


REQUIRED = "required"


def readme_config_table() -> dict[str, str]:
    """key -> its documented default, from the README's configuration table."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| key | default | allowed |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        key, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
        rows[key.strip("`")] = default
    return rows


def documented_value(text: str):
    """The value a default cell states before its explanation: `8742`, null, `[]`, required."""
    return yaml.safe_load(text.split(" (")[0].strip("`"))


def is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def code_defaults(section: type[BaseModel] = MenddConfig, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default of every key the configuration model has; a list of sections (feeds)
    is a key itself, and its items' keys are `feeds[].name`."""
    found: dict[str, object] = {}
    for name, field in section.model_fields.items():
        key = prefix + name
        if is_section(field.annotation):
            found.update(code_defaults(field.annotation, key + "."))
            continue
        found[key] = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        if get_origin(field.annotation) is list and is_section(item := get_args(field.annotation)[0]):
            found.update(code_defaults(item, key + "[]."))
    return found


def test_the_readme_configuration_table_has_exactly_the_keys_the_code_has() -> None:
    assert sorted(readme_config_table()) == sorted(code_defaults())


def test_the_readme_configuration_table_states_the_default_the_code_has_for_every_key() -> None:
    defaults = code_defaults()
    for key, text in readme_config_table().items():
        documented = documented_value(text)
        # The types too: 1 == True and 1 == 1.0, but `true` is not a count and `1` is not a fraction.
        assert (documented, type(documented)) == (defaults[key], type(defaults[key])), key


def test_init_writes_the_routed_memory_for_the_default_model_and_the_plain_defaults_for_others(tmp_path: Path) -> None:
    smol = load_config(init_home(Home(tmp_path / "smol"), "smollm2-135m"))
    tiny = load_config(init_home(Home(tmp_path / "tiny"), "tiny-llama"))
    assert (smol.editor.memory, smol.batch_size, smol.editor.mend_step_scale()) == ("routed", 10, 1.6)
    assert (tiny.editor.memory, tiny.batch_size, tiny.editor.mend_step_scale()) == ("weights", 1, 1.0)


def test_a_home_made_by_code_keeps_the_profile_under_its_own_settings(tmp_path: Path) -> None:
    config = load_config(init_home(Home(tmp_path / "h"), "smollm2-135m", settings={"batch_size": 2}))
    assert (config.editor.memory, config.batch_size) == ("routed", 2)


@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_refused_not_read_as_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        token: str) -> None:
    message = config_error(home_with(tmp_path, f"http: {{token: '{token}'}}\n"))
    assert "http.token" in message and "empty" in message
    monkeypatch.setenv("MENDD_HTTP__TOKEN", token)
    message = config_error(home_with(tmp_path, ""))
    assert "http.token" in message and "empty" in message and "MENDD_HTTP__TOKEN" in message
