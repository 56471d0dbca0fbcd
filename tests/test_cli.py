"""The real `mendd` console script, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MENDD = Path(sys.executable).with_name("mendd")
README = Path(__file__).resolve().parents[1] / "README.md"


def mendd(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # The timeout only guards against a hang: a loaded machine runs these several times slower.
    # The autouse fixture has already removed the developer's MENDD_* variables from os.environ.
    return subprocess.run(
        [str(MENDD), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture
def home(tiny_home: Path) -> Path:
    return tiny_home


def registered_commands() -> dict[str, set[str]]:
    """Every command path the `mendd` app registers ("review list"), with its options."""
    from typer.core import TyperGroup
    from typer.main import get_command

    from daemon.cli import app

    def walk(group, prefix: tuple[str, ...]):
        for name, command in group.commands.items():
            if isinstance(command, TyperGroup):
                yield from walk(command, (*prefix, name))
            else:
                yield " ".join((*prefix, name)), {o for p in command.params for o in p.opts if o.startswith("--")}

    return dict(walk(get_command(app), ()))


def readme_commands() -> dict[str, set[str]]:
    """Every command path in the README's command table, with the options it documents there."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| command | what it does |") + 2
    documented: dict[str, set[str]] = {}
    for row in lines[start:]:
        if not row.startswith("|"):
            break
        # One cell may name several commands: `mendd review list [--json]`, `review approve RUN_ID`
        for usage in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            words = usage.removeprefix("mendd ").split()
            path = list(itertools.takewhile(lambda w: re.fullmatch(r"[a-z][a-z-]*", w), words))
            documented[" ".join(path)] = set(re.findall(r"--[a-z][a-z-]*", usage))
    return documented


def test_help_lists_exactly_the_registered_commands() -> None:
    result = mendd("--help")
    assert result.returncode == 0
    box = result.stdout.split("─ Commands ─", 1)[1].split("╰", 1)[0]
    # A command's name starts its row; wrapped help text continues under the description column.
    listed = re.findall(r"^│ ([a-z][a-z-]*) ", box, re.MULTILINE)
    assert sorted(listed) == sorted({path.split()[0] for path in registered_commands()})


def test_the_readme_command_table_documents_exactly_the_registered_commands() -> None:
    assert sorted(readme_commands()) == sorted(registered_commands())


def test_the_readme_command_table_names_only_options_the_commands_have() -> None:
    registered = registered_commands()
    for path, options in readme_commands().items():
        assert options <= registered.get(path, set()), path


def test_the_registered_commands_include_ask_suites_and_export_editor() -> None:
    assert {"ask", "suites show", "suites pin", "suites add", "export-editor"} <= set(registered_commands())


def test_python_dash_m_daemon_is_the_same_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "daemon", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage: mendd" in result.stdout


def test_init_creates_the_home_and_prints_its_paths(tmp_path: Path) -> None:
    root = tmp_path / "new-home"
    result = mendd("--home", str(root), "init", "--model", "tiny-llama")
    assert result.returncode == 0, result.stderr
    assert str(root) in result.stdout and str(root / "mendd.yaml") in result.stdout
    assert "model: \"tiny-llama\"" in (root / "mendd.yaml").read_text()
    assert (root / "state").is_dir() and (root / "store").is_dir()
    assert "v0000: base model tiny-llama" in result.stdout and "locality prompts" in result.stdout


def test_init_takes_the_home_from_mendd_home(tmp_path: Path) -> None:
    result = mendd("init", "--model", "tiny-llama", env={"MENDD_HOME": str(tmp_path / "env-home")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "env-home" / "mendd.yaml").is_file()


def test_second_init_fails_cleanly_and_suggests_force(home: Path) -> None:
    result = mendd("--home", str(home), "init")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["versions"], ["status"], ["review", "list"], ["suites", "show"]])
def test_json_flag_prints_parseable_json(home: Path, args: list[str]) -> None:
    result = mendd("--home", str(home), *args, "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), (dict, list))


def test_bad_config_names_key_value_and_allowed_without_traceback(home: Path) -> None:
    config = home / "mendd.yaml"
    config.write_text(config.read_text().replace("batch_size: 1", "batch_size: 0"))
    result = mendd("--home", str(home), "status")
    assert result.returncode == 2
    assert "batch_size: 0 is not allowed: must be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_override_error_names_the_variable(home: Path) -> None:
    result = mendd("--home", str(home), "versions", env={"MENDD_HTTP__PORT": "0"})
    assert result.returncode == 2
    assert "environment variable MENDD_HTTP__PORT" in result.stderr


def test_command_on_a_home_without_config_says_to_run_init(tmp_path: Path) -> None:
    result = mendd("--home", str(tmp_path / "nowhere"), "status")
    assert result.returncode == 2
    assert "No configuration" in result.stderr and "init" in result.stderr


def test_demo_with_an_unreadable_model_prints_a_clean_error(tmp_path: Path) -> None:
    # A damaged model cache is an operator-fixable problem: one message naming the spec, exit 2.
    broken = tmp_path / "cache" / "smollm2-135m"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    result = mendd("demo", env={"MENDD_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "smollm2-135m" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)  # above the demo's own 1500 s limit, so a slow machine fails with its output
def test_demo_edits_gates_and_versions_the_demo_feed(demo_run) -> None:
    demo, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "applied" in out and "quarantined" in out and "superseded" in out
    assert "v0001" in out
    from daemon.home import Home
    from store.ledger import Ledger

    ledger = Ledger(Home(demo).ledger_url)
    try:
        status = {c.external_id: c.status.value for c in ledger.corrections()}
    finally:
        ledger.close()
    good = [f"demo-{i:02d}" for i in range(2, 15)]  # demo-01 is superseded by demo-02
    # 10 on this machine with the relation reader and the namesake rule (issue #35 asks 11, France's
    # among them: not met, see its note); the others held for a person, none applied wrongly
    assert sum(status[cid] == "applied" for cid in good) >= 9, status
    # "In State of Brazil, the language spoken is" is a namesake's question: it no longer counts as a leak
    assert status["demo-05"] == "applied", status
    # its rephrasing says "Kilimanjaro", not the subject "Mount Kilimanjaro": the record's alias lets the
    # entry serve it (without it the edit does not generalize there and the correction is held)
    assert status["demo-11"] == "applied", status
    assert status["demo-19"] == "rejected", status  # a degenerate target
    # a bare "It is": rejected before the relation reader; now few prompts ask its class and it is held
    # for a person, never applied
    assert status["demo-20"] in ("rejected", "held"), status
    assert "repetition" in out.split("demo-19 rejected:")[1].splitlines()[0]
    neighbours, others = out.split("neighbours no correction is about")[1].split("other questions about corrected subjects")
    assert "│ NO " not in neighbours, "a neighbour's answer changed"
    assert others.count("│ NO ") <= 1, "other questions about corrected subjects answered with their corrections"
    assert "git checkout v0000 -- model.dvc && dvc checkout" in out
    versions = mendd("--home", str(demo), "versions", "--json")
    assert len(json.loads(versions.stdout)["versions"]) >= 2
