"""`mendd export`: a version as a folder that plain transformers loads, in a process without mendd,
and that answers as mendd serves that version (routed memory: the exported modeling file routes and
stops entries as mendd does)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from decision_helpers import ACCEPT_ALL, FACTS, make_decision_home, open_runtime
from test_cli import mendd
from test_routing import _decide

PROJECT = Path(__file__).resolve().parents[1]
ROUTED_STRONG = {"memory": "routed", "routing_layer": 1, "projection": False, "step_scale": 100.0}
UNRELATED = ["Zebras graze on", "The weather today is"]

# Run in a fresh interpreter with the project taken off its path: only torch and transformers.
LOADER = textwrap.dedent("""
    import json, sys
    sys.path = [p for p in sys.path if p.rstrip("/") != {project!r}]
    sys.meta_path = [f for f in sys.meta_path if "__editable___mendd" not in getattr(f, "__module__", "")]
    import importlib.util
    assert importlib.util.find_spec("editors") is None and importlib.util.find_spec("daemon") is None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = {{"class": type(model).__name__, "answers": [], "logits": []}}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        out["answers"].append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
        with torch.no_grad():
            out["logits"].append(model(input_ids=ids).logits[0, -1].tolist())
    print(json.dumps(out))
""")


def load_outside_mendd(folder: Path, prompts: list[str], tokens: int) -> dict:
    script = LOADER.format(project=str(PROJECT))
    done = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(prompts), str(tokens)],
                          capture_output=True, text=True, cwd=folder.parent, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(folder.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def served(home, prompts: list[str], tokens: int) -> tuple[list[str], list[torch.Tensor]]:
    from editors.routing import Routed
    from editors.serving import continuation

    rt = open_runtime(home)
    try:
        answers = [continuation(rt.editable, p, tokens, rt.memory) for p in prompts]
        logits = []
        for prompt in prompts:
            batch = rt.editable.batch([(prompt, "x")])
            with torch.no_grad():  # as the gate reads them: the first answer token's are the prompt's next-token logits
                logits.append(rt.editable.logits(batch, Routed(rt.memory))[0])
        return answers, logits
    finally:
        rt.close()


@pytest.fixture(scope="module")
def routed_home(tmp_path_factory, data_root):
    home = make_decision_home(tmp_path_factory.mktemp("export") / "home", ACCEPT_ALL, data_root, ROUTED_STRONG)
    assert _decide(home).version.tag == "v0001"
    return home


def test_a_routed_version_exported_answers_outside_mendd_as_mendd_serves_it(routed_home, tmp_path: Path) -> None:
    out = tmp_path / "v0001"
    done = mendd("--home", str(routed_home.root), "export", "v0001", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"version": "v0001", "folder": str(out), "routed": True, "entries": 2}
    prompts = [FACTS[0].prompt, FACTS[0].rephrases[0], *UNRELATED]
    outside = load_outside_mendd(out, prompts, 8)
    answers, logits = served(routed_home, prompts, 8)
    assert outside["class"] == "MenddRoutedLlamaForCausalLM"
    assert outside["answers"] == answers
    worst = max((torch.tensor(o) - m).abs().max().item() for o, m in zip(outside["logits"], logits))
    assert worst <= 1e-4


def test_the_exported_memory_changes_the_answer_the_base_weights_give(routed_home, tmp_path: Path) -> None:
    base, edited = tmp_path / "v0000", tmp_path / "v0001"
    for tag, folder in (("v0000", base), ("v0001", edited)):
        assert mendd("--home", str(routed_home.root), "export", tag, "--out", str(folder)).returncode == 0
    assert not (base / "modeling_mendd.py").exists()  # no memory: a plain Hugging Face folder
    before, after = (load_outside_mendd(f, [FACTS[0].prompt, UNRELATED[0]], 8)["answers"] for f in (base, edited))
    assert before[0] != after[0] and before[1] == after[1]


def test_export_into_a_folder_that_holds_files_is_refused(routed_home, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    done = mendd("--home", str(routed_home.root), "export", "v0001", "--out", str(tmp_path / "taken"))
    assert done.returncode != 0 and "not empty" in done.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_export_of_an_unknown_version_names_it(routed_home, tmp_path: Path) -> None:
    done = mendd("--home", str(routed_home.root), "export", "v0042", "--out", str(tmp_path / "x"))
    assert done.returncode != 0 and "v0042" in done.stderr and not (tmp_path / "x").exists()


CHAT_LOADER = textwrap.dedent("""
    import json, sys
    sys.path = [p for p in sys.path if p.rstrip("/") != {project!r}]
    sys.meta_path = [f for f in sys.meta_path if "__editable___mendd" not in getattr(f, "__module__", "")]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, question, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{{"role": "user", "content": question}}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    print(json.dumps(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
""")


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(2400)
def test_the_demo_s_louvre_correction_is_answered_alike_by_the_endpoint_and_the_exported_folder(demo_run, tmp_path: Path) -> None:
    import openai

    from daemon.home import Home
    from service_harness import configure, free_port, start_service, wait_for

    demo, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    home = Home(demo)
    # demo-07 (the Louvre -> London) is applied in every demo run; the Japan correction (demo-09) is held
    # when its batch-mate (the Amazon) is: the relation reader refuses the Amazon's rephrasing (#35)
    question = "Where is the Louvre?"
    port = free_port()
    configure(home, port, [])
    process = start_service(home, tmp_path / "service.log")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    try:
        wait_for(lambda: _answers(client), 300, "the endpoint", process)
        chat = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=16,
                                              messages=[{"role": "user", "content": question}])
    finally:
        process.terminate()
        process.wait(timeout=120)
    served = chat.choices[0].message.content
    assert chat.model_extra["mendd"]["served_by"] == "demo-07", served  # the Louvre correction's entry answered
    out = tmp_path / "served"
    assert mendd("--home", str(demo), "export", chat.system_fingerprint, "--out", str(out), timeout=600).returncode == 0
    done = subprocess.run([sys.executable, "-c", CHAT_LOADER.format(project=str(PROJECT)), str(out), question, "16"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == served


def _answers(client) -> bool:
    import openai

    try:
        return bool(client.models.list().data)
    except openai.APIConnectionError:
        return False
