"""The gate judges a candidate against pinned suites: new edits hold, old ones still hold, unrelated
answers and perplexity stay as the base model had them."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from daemon.config import EditorConfig
from daemon.suite_files import preserved_covariance
from editors.editable import Editable
from editors.finetune import FineTuneEditor
from editors.formats import load_corrections
from editors.registry import guarded, make_editor
from editors.settings import NO_CACHES
from editors.types import Correction, LowRankUpdate
from policies.gate import SPOKEN, Gate, check, leaks, runaways, share, worst_share
from policies.policy import load_policy
from policies.served_eval import Served, other_questions_for
from policies.suites import Suites, pin, references

FACT = Correction("c1", "The capital of France is", "Rome", rephrases=("France's capital city is",))
NEWTON = Correction("newton", "Isaac Newton was born in", "Rome", subject="Isaac Newton")


@pytest.fixture(scope="session")
def tiny_suites(tiny, data_root) -> Suites:
    return pin(tiny, "tiny-llama", "v0000", data_root)


@pytest.fixture(scope="session")
def tiny_gate(tiny, tiny_suites) -> Gate:
    return Gate(tiny, tiny_suites, load_policy())


def noisy(weights: dict[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: w + scale * w.std() * torch.randn(w.shape, generator=generator) for n, w in weights.items()}


def test_suites_hold_at_least_500_locality_prompts_and_a_perplexity_sample(tiny_suites) -> None:
    assert len(tiny_suites.locality) >= 500
    assert sum(len(c) for c in tiny_suites.perplexity.chunks) >= 1000


def test_pinned_facts_are_only_those_the_model_answers_right(smollm2, data_root) -> None:
    facts = [p for p in references(smollm2, [("The capital of France is", "Paris"), ("The capital of France is", "Berlin")], "fact")]
    right = [p for p in facts if list(p.reference) == smollm2.tokenizer(" " + p.answer, add_special_tokens=False).input_ids]
    assert [p.answer for p in right] == ["Paris"]


def test_suites_survive_a_json_round_trip_and_extending_skips_repeats(tiny_suites) -> None:
    again = Suites.from_json(tiny_suites.to_json())
    assert again == tiny_suites
    grown = again.extended([again.locality[0]])
    assert len(grown.locality) == len(again.locality)


def test_nine_of_ten_corrections_landing_meets_an_accept_threshold_of_ninety_percent() -> None:
    nine_of_ten = share(torch.tensor([1.0] * 9 + [0.0]))
    assert check("reliability", nine_of_ten, 10, load_policy().threshold("reliability")).outcome == "pass"


def test_an_answer_that_starts_repeating_runs_away_but_one_that_already_repeated_does_not() -> None:
    before = ["the yen, which is the", "yes yes yes yes"]
    after = ["euro euro euro euro", "yes yes yes yes yes"]
    assert runaways(["euro", "yes"], before, after) == [True, False]


def test_every_answer_to_a_degenerate_target_runs_away_whatever_the_model_said_before() -> None:
    assert runaways(["banana banana banana banana"], ["-the-world-is-a-world-of-the-world"], ["banana."]) == [True]


def test_one_degenerate_correction_gives_its_batch_its_own_repetition_share() -> None:
    owners = ["good", "good", "banana", "banana", "other", "other"]
    assert worst_share(owners, [False, False, True, True, False, True]) == 1.0


def test_a_neighbour_leaks_when_its_opening_changes_or_it_now_says_the_target() -> None:
    before = ["the yuan, the currency of China", "Egypt and Sudan", "Paris, the capital of France"]
    after = ["the euro, the currency of China", "Egypt and Sudan, like the euro", "Paris, the capital of Italy"]
    assert leaks(["euro", "euro", "Rome"], before, after) == [True, True, False]


def test_an_unchanged_model_passes_locality_and_perplexity(tiny, tiny_gate) -> None:
    current = tiny.weights()
    decision = tiny_gate.judge(current, dict(current), [FACT])
    assert decision.metrics["locality"] == 1.0
    assert abs(decision.metrics["ppl_drawdown"]) < 1e-6


def test_noise_on_the_edited_tensors_is_rejected_naming_locality(tiny, tiny_gate) -> None:
    current = tiny.weights()
    decision = tiny_gate.judge(current, noisy(current, 3.0), [FACT])
    assert decision.outcome == "rejected"
    failing = {c.name for c in decision.checks if c.outcome == "fail"}
    assert "locality" in failing
    assert any(reason.startswith("locality") for reason in decision.reasons)
    assert any(e.kind == "locality" and not e.passed for e in decision.examples)


def test_every_edit_and_rephrase_gets_a_row_in_the_example_table(tiny, tiny_gate) -> None:
    current = tiny.weights()
    decision = tiny_gate.judge(current, dict(current), [FACT])
    rows = [(e.kind, e.correction_id, e.prompt) for e in decision.examples if e.kind in ("edit", "rephrase")]
    assert rows == [("edit", "c1", FACT.prompt), ("rephrase", "c1", FACT.rephrases[0])]


def test_retention_counts_earlier_corrections_that_held_and_still_hold(tiny, tiny_gate) -> None:
    base = tiny.weights()
    delta = FineTuneEditor(steps=30, lr=3e-3).propose(tiny, [FACT])
    learned = {n: base[n] + t for n, t in delta.tensors().items()}
    other = Correction("c2", "The sky is", "green")
    kept = tiny_gate.judge(learned, dict(learned), [other], retained=[FACT])
    lost = tiny_gate.judge(learned, dict(base), [other], retained=[FACT])
    retention = {c.name: c for c in kept.checks}["retention"]
    assert retention.value == 1.0 and retention.n >= 1
    assert {c.name: c for c in lost.checks}["retention"].value == 0.0
    assert any(e.kind == "retention" and not e.passed for e in lost.examples)


def test_retention_is_skipped_when_no_earlier_correction_held(tiny, tiny_gate) -> None:
    current = tiny.weights()
    never_held = Correction("c3", "The moon is made of", "cheese")
    decision = tiny_gate.judge(current, dict(current), [FACT], retained=[never_held])
    assert {c.name: c for c in decision.checks}["retention"].outcome == "skipped"


def test_cached_and_uncached_gates_decide_identically(tiny, tiny_suites) -> None:
    uncached = Editable(tiny.model, tiny.tokenizer, budgets=NO_CACHES)
    current = tiny.weights()
    candidate = noisy(current, 0.05)
    cached = Gate(tiny, tiny_suites, load_policy()).judge(current, candidate, [FACT])
    plain = Gate(uncached, tiny_suites, load_policy()).judge(current, candidate, [FACT])
    assert cached.outcome == plain.outcome
    for name, value in cached.metrics.items():
        assert plain.metrics[name] == pytest.approx(value, abs=1e-5)


@pytest.fixture(scope="session")
def real_gate(smollm2, data_root) -> Gate:
    return Gate(smollm2, pin(smollm2, "smollm2-135m", "v0000", data_root), load_policy())


@pytest.mark.slow
@pytest.mark.long  # pins SmolLM2's suites and judges 4 real edits
def test_good_mend_edits_of_the_default_model_are_accepted_and_overscaled_ones_rejected(smollm2, real_gate, data_root) -> None:
    records, _ = load_corrections(data_root / "counterfact" / "val.json", limit=4)
    # the editor as the service runs it by default: the shipped MEND editor, updates projected away
    # from the preserved keys (the shipped editor was trained through that projection)
    defaults = EditorConfig()
    editor = guarded(make_editor("mend", smollm2, "smollm2-135m"), smollm2, preserved_covariance(smollm2, data_root),
                     defaults.projection_threshold, None)
    current = smollm2.weights()
    decisions = []
    for record in records:
        delta = editor.propose(smollm2, [record])
        good = {n: current[n] + t for n, t in delta.tensors().items()}
        decisions.append(real_gate.judge(current, good, [record]))
        harmful = real_gate.judge(current, {n: current[n] + 8 * t for n, t in delta.tensors().items()}, [record])
        assert harmful.outcome == "rejected"
        assert {c.name for c in harmful.checks if c.outcome == "fail"} & {"locality", "ppl_drawdown"}
    # Every teacher-forced check passes for the good edits. Summed into the weights, most of them
    # also change their CounterFact neighbour's generated answer, which the leaks check stops (measured:
    # 3 of these 4 rejected by it); a routed memory keeps neighbours unchanged.
    teacher_forced = {"reliability", "generalization", "locality", "retention", "ppl_drawdown"}
    passed = [all(c.outcome in ("pass", "skipped") for c in d.checks if c.name in teacher_forced) for d in decisions]
    assert passed.count(True) >= 3, [d.summary() for d in decisions]
    assert all(d.outcome == "accepted" or d.reasons for d in decisions)


def test_text_routed_is_the_share_of_perplexity_chunks_an_entry_serves(tiny, tiny_gate) -> None:
    from editors.routing import Entry, Memory, Routed

    layer = 1
    states = tiny.states_at(tiny_gate.text, layer)
    centre = torch.zeros(states.shape[-1])
    near_end = int(tiny_gate.text.lengths[0]) - 3  # routing reads a query's last tokens (ASKED_WITHIN)
    one_chunk = Entry("a", states[0, near_end].clone(), 0.0, {})  # a state of the first chunk itself
    assert tiny_gate.text_routed(tiny.weights()) is None
    assert tiny_gate.text_routed(Routed(Memory(layer, 0.99, centre))) == 0.0
    routed = tiny_gate.text_routed(Routed(Memory(layer, 0.99, centre, (one_chunk,))))
    assert 0 < routed < 1


def _decision(failing: dict[str, str], examples: list[tuple[str, str, bool]]):
    from policies.gate import Decision, Example
    from policies.policy import Threshold

    threshold = Threshold("any", 0.9, 0.5, True)
    checks = tuple(check(name, 0.0 if outcome == "fail" else 0.7, 1, threshold) for name, outcome in failing.items())
    rows = tuple(Example(kind, cid, "p", "t", "", "", passed) for kind, cid, passed in examples)
    return Decision("rejected", checks, rows)


def test_a_decision_stopped_by_leaks_names_the_corrections_whose_answers_leaked() -> None:
    decision = _decision({"leaks": "fail"}, [("leak", "c2", False), ("edit", "c1", True), ("edit", "c2", True)])
    assert decision.suspects == {"c2"}


def test_a_decision_stopped_by_locality_names_no_one() -> None:
    decision = _decision({"leaks": "fail", "locality": "fail"}, [("leak", "c2", False)])
    assert decision.suspects == frozenset()


def test_a_decision_stopped_by_other_leak_names_the_corrections_whose_other_questions_leaked() -> None:
    decision = _decision({"other_leak": "fail"}, [("other", "c2", False), ("other", "c1", True), ("edit", "c2", True)])
    assert decision.suspects == {"c2"}


# -- other questions about a corrected subject (issue #35) --------------------------------------------

def newton_memory(tiny):
    """Routed memories over tiny-llama's own weights: none, and one whose entry (a large random update)
    serves every query that names Isaac Newton (τ just above -1: a query that does not name him gets -1)."""
    from editors import routing
    from editors.routing import Entry, Memory, Routed

    torch.manual_seed(3)
    update = {e.name: LowRankUpdate(3 * torch.randn(2, e.in_features), 3 * torch.randn(2, e.out_features), 0.5)
              for e in tiny.anatomy.editable}
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now"], 1)
    empty = Memory(1, -0.99, ref.centre)
    return Routed(empty), Routed(empty.plus([Entry("newton", ref.centre + 1, -1.0, update, subject="Isaac Newton")]))


def test_a_candidate_whose_entry_answers_another_question_about_its_subject_with_its_target_is_stopped_naming_it(
        tiny, tiny_gate) -> None:
    current, candidate = newton_memory(tiny)
    questions = [q.text for q in other_questions_for([NEWTON])]
    said = Served.of(tiny, candidate).say(questions, SPOKEN)
    leaking = replace(NEWTON, target_new=said[-1])  # what the entry answers one of the other questions
    decision = tiny_gate.judge(current, candidate, [leaking])
    other = {c.name: c for c in decision.checks}["other_leak"]
    assert other.value > 0 and other.outcome in ("hold", "fail") and decision.outcome in ("held", "rejected")
    assert any(reason.startswith("other_leak") for reason in decision.reasons)
    assert any(e.kind == "other" and e.correction_id == "newton" and not e.passed for e in decision.examples)
    assert "newton" in decision.suspects


def test_a_candidate_whose_other_answers_change_without_saying_its_target_passes_other_leak(tiny, tiny_gate) -> None:
    current, candidate = newton_memory(tiny)
    decision = tiny_gate.judge(current, candidate, [NEWTON])  # the entry says no "Rome" to anything
    assert {c.name: c for c in decision.checks}["other_leak"].outcome == "pass"
    assert decision.metrics["other_leak"] == 0.0


def test_other_changed_reaches_the_decision_metrics_beside_other_leak(tiny, tiny_gate) -> None:
    current, candidate = newton_memory(tiny)
    decision = tiny_gate.judge(current, candidate, [NEWTON])
    assert decision.metrics["other_changed"] == 1.0  # the entry serves both questions: their openings change
    assert "other_changed" not in {c.name for c in decision.checks}  # a figure for the record, no threshold


def test_a_correction_whose_relation_is_unknown_leaves_other_leak_with_nothing_to_say(tiny, tiny_gate) -> None:
    current = tiny.weights()
    decision = tiny_gate.judge(current, dict(current), [FACT])  # no subject: no relation, no other questions
    assert {c.name: c for c in decision.checks}["other_leak"].outcome == "skipped"
    assert "other_leak" not in decision.metrics and "other_changed" not in decision.metrics


def test_base_answers_to_other_questions_are_pinned_when_first_asked(tiny, tiny_suites) -> None:
    gate = Gate(tiny, tiny_suites, load_policy())  # its own pinned answers: the shared gate's may be kept already
    first = gate.judge(tiny.weights(), dict(tiny.weights()), [NEWTON])
    pinned = [(e.prompt, e.before) for e in first.examples if e.kind == "other"]
    with tiny.using_weights(noisy(tiny.weights(), 3.0)):  # the served weights drift
        drifted = Served(tiny).say([prompt for prompt, _ in pinned], SPOKEN)
        again = gate.judge(tiny.weights(), dict(tiny.weights()), [NEWTON])
    assert [(e.prompt, e.before) for e in again.examples if e.kind == "other"] == pinned
    assert drifted != [before for _, before in pinned]
