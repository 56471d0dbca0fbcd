"""The review UI as a reviewer meets it: `mendd ui` serves the home's MLflow; decisions are found by
tag through the server, and the run page, rendered by a real headless Chromium, shows the decision."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from daemon import tracking
from decision_helpers import FACTS, HOLD_ALL, make_decision_home
from test_review import decide_facts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mendd ui exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {seconds} s")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_run_page_in_the_mendd_ui_shows_the_decision_tag(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    result, _ = decide_facts(home, FACTS[:1])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([str(Path(sys.executable).with_name("mendd")), "--home", str(home.root), "ui", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(url, ui)
        client = tracking.client(url)
        experiment = client.get_experiment_by_name("mendd/tiny-llama")
        found = client.search_runs([experiment.experiment_id], f"tags.`{tracking.DECISION_TAG}` = 'held'")
        assert [run.info.run_id for run in found] == [result.run_id]

        page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{result.run_id}"
        screenshot = tmp_path / "run.png"
        env = {**os.environ, "HOME": str(tmp_path)}  # chromium writes its profile under HOME
        shot = subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={screenshot}", page],
                              capture_output=True, text=True, timeout=120, env=env)
        assert screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
        dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", page], capture_output=True, text=True, timeout=120, env=env)
        assert 'title="mendd.decision"' in dom.stdout, dom.stderr[-2000:]
        assert 'title="held"' in dom.stdout
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
