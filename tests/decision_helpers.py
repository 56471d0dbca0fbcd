"""A tiny-llama home ready to make decisions: v0000, pinned suites, a fresh MEND editor, and a policy
chosen by the test (so that a test can make the same edit accepted, held or rejected)."""
from __future__ import annotations

from pathlib import Path

from daemon.config import load_config
from daemon.home import Home
from daemon.provision import provision_home
from daemon.runtime import Runtime
from editors.editable import Editable
from editors.mend import MendEditor
from editors.types import Correction
from store.models import load_model

FACTS = [
    Correction("c1", "The capital of France is", "Rome", rephrases=("France's capital city is",)),
    Correction("c2", "Danielle Darrieux's mother tongue is", "English"),
]


def policy(reliability=(0.0, 0.0), locality=(0.0, 0.0), ppl=(10.0, 10.0)) -> str:
    """A policy YAML; each pair is (accept, hold)."""
    return (f"checks:\n  reliability: {{accept: {reliability[0]}, hold: {reliability[1]}}}\n"
            "  generalization: {accept: 0.0, hold: 0.0}\n"
            f"  locality: {{accept: {locality[0]}, hold: {locality[1]}}}\n"
            "  retention: {accept: 0.0, hold: 0.0}\n"
            f"  ppl_drawdown: {{accept: {ppl[0]}, hold: {ppl[1]}}}\n")


ACCEPT_ALL = policy()
HOLD_ALL = policy(reliability=(1.0, 0.0))  # a fresh editor's edit never reaches reliability 1
REJECT_ALL = policy(reliability=(1.0, 1.0))


ROUTED = {"memory": "routed", "routing_layer": 1}  # tiny-llama's first edited block is 1


def make_decision_home(root: Path, policy_text: str, data_root: Path, editor: dict | None = None) -> Home:
    """`editor`: settings of mendd.yaml's editor section beside the fresh editor's path."""
    loaded = load_model("tiny-llama")
    home = provision_home(Home(root), "tiny-llama", loaded, data_root=data_root,
                          settings={"editor": {"path": "editor.safetensors", **(editor or {})}, "policy": "policy.yaml"})
    MendEditor.fresh(Editable(loaded.model, loaded.tokenizer), edit_lr=1e-2).network.save(root / "editor.safetensors")
    (root / "policy.yaml").write_text(policy_text)
    return home


def open_runtime(home: Home) -> Runtime:
    return Runtime.open(home, load_config(home))
