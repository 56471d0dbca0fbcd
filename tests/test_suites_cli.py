"""The gate's suites as an operator sees them: pinned by init, shown, extended from a file."""
from __future__ import annotations

import json
from pathlib import Path

from test_cli import mendd


def test_init_pins_suites_and_an_operator_can_extend_them(tiny_home: Path, tmp_path: Path) -> None:
    root = tiny_home
    before = json.loads(mendd("--home", str(root), "suites", "show", "--json").stdout)
    assert sum(before["locality"].values()) >= 500 and before["pinned_from"] == "v0000"
    extra = tmp_path / "mine.jsonl"
    extra.write_text(json.dumps({"prompt": "Our support line opens at", "answer": "9 am"}) + "\n"
                     + json.dumps({"prompt": "Our CEO is", "answer": "Ada"}) + "\n")
    added = mendd("--home", str(root), "suites", "add", str(extra), timeout=300)
    assert added.returncode == 0, added.stderr
    assert "added 2 locality prompts (reference: v0000)" in added.stdout
    after = json.loads(mendd("--home", str(root), "suites", "show", "--json").stdout)
    assert after["locality"]["operator"] == 2


def test_a_bad_suite_file_names_the_line_and_field_and_adds_nothing(tiny_home: Path, tmp_path: Path) -> None:
    root = tiny_home
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "answer": "fine"}) + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    result = mendd("--home", str(root), "suites", "add", str(bad), timeout=300)
    assert result.returncode == 2
    assert "line 2, field 'answer'" in result.stderr and "nothing was added" in result.stderr
    shown = json.loads(mendd("--home", str(root), "suites", "show", "--json").stdout)
    assert "operator" not in shown["locality"]
