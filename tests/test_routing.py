"""The routed memory (editor.memory: routed): each accepted correction kept as its own update with a
key; a query runs with the update whose key it matches, else with the unchanged weights. The
routing rule, the routed model's logits, and routed versions through the real cycle and store."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from daemon.config import ConfigError
from daemon.cycle import decide, decide_revert
from daemon.feeds import enqueue
from decision_helpers import ACCEPT_ALL, FACTS, HOLD_ALL, ROUTED, make_decision_home, open_runtime
from editors import routing
from editors.memory_model import (ASKED_WITHIN, LEAD_TAU, SAME_SUBJECT, Asked, RelationReader, asked_of, choose, entry_relations,
                                  full_name, index_words, named_entries, route_queries, similarities, subject_index, unnamed)
from editors.routing import NONE, Entry, Memory, Routed
from editors.types import Correction, LowRankUpdate
from store.checkpoint import read_tensor_file
from store_helpers import tool
from test_cli import mendd


# -- the rule --------------------------------------------------------------------------------------

def test_a_query_goes_to_the_most_similar_entry_that_reaches_tau_and_its_floor() -> None:
    similarity = torch.tensor([[0.9, 0.95, 0.2], [0.5, 0.6, 0.7], [0.85, 0.1, 0.99]])
    floors = torch.tensor([0.0, 0.0, 0.995])  # the third key resembles everything: it must match closely
    assert choose(similarity, floors, tau=0.8).tolist() == [1, NONE, 0]


def test_with_no_entries_every_query_keeps_the_base_weights() -> None:
    assert choose(torch.zeros(3, 0), torch.zeros(0), 0.5).tolist() == [NONE] * 3


def test_a_margin_makes_a_key_that_resembles_everything_match_almost_exactly() -> None:
    similarity = torch.tensor([[0.97], [0.99]])
    floors = torch.tensor([0.96])  # halfway from 0.96 to 1 is 0.98
    assert choose(similarity, floors, tau=0.5, margin=0.0).tolist() == [0, 0]
    assert choose(similarity, floors, tau=0.5, margin=0.5).tolist() == [NONE, 0]


def test_of_entries_about_one_subject_the_one_whose_relation_is_nearest_the_query_s_serves() -> None:
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.02, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    assert (keys[0] @ keys[1]).item() >= SAME_SUBJECT
    similarity = torch.tensor([[0.95, 0.94, 0.1], [0.95, 0.94, 0.1]])  # both queries name the subject
    ends = torch.tensor([[0.2, 0.9, 0.0], [0.8, 0.1, 0.0]])  # the first asks the second entry's question
    chosen = choose(similarity, torch.zeros(3), 0.8, 0.0, keys, ends, torch.eye(3))
    assert chosen.tolist() == [1, 0]


def test_relations_do_not_choose_between_entries_about_different_subjects() -> None:
    keys = torch.eye(3)
    similarity = torch.tensor([[0.95, 0.9, 0.1]])
    ends = torch.tensor([[0.1, 0.9, 0.9]])
    assert choose(similarity, torch.zeros(3), 0.8, 0.0, keys, ends, torch.eye(3)).tolist() == [0]


def test_a_namesake_that_does_not_reach_tau_is_not_chosen_by_its_relation() -> None:
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01]]), dim=-1)
    similarity = torch.tensor([[0.95, 0.5]])
    ends = torch.tensor([[0.1, 0.9]])
    assert choose(similarity, torch.zeros(2), 0.8, 0.0, keys, ends, torch.eye(2)).tolist() == [0]


def test_given_relation_tau_an_entry_does_not_serve_a_query_that_asks_another_question() -> None:
    similarity = torch.tensor([[0.95], [0.95]])  # both queries name the entry's subject
    ends = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the second asks something else
    relations = torch.tensor([[1.0, 0.0]])
    args = (similarity, torch.zeros(1), 0.8, 0.0, torch.eye(1, 2), ends, relations)
    assert choose(*args).tolist() == [0, 0]
    assert choose(*args, relation_tau=0.5).tolist() == [0, NONE]


def test_relation_tau_passes_an_entry_stored_without_a_relation() -> None:
    similarity = torch.tensor([[0.95]])
    chosen = choose(similarity, torch.zeros(1), 0.8, 0.0, torch.eye(1, 2), torch.tensor([[0.0, 1.0]]),
                    torch.zeros(1, 2), relation_tau=0.5)
    assert chosen.tolist() == [0]


def reader_of(classes: int, hidden: int, floor: float = 0.05) -> RelationReader:
    """A reader that reads relation i from a state's i-th coordinate (sharply)."""
    return RelationReader(20 * torch.eye(hidden, classes), torch.zeros(classes), torch.zeros(hidden), torch.ones(hidden), floor)


def test_a_query_that_asks_another_relation_of_the_subject_is_not_served_by_its_entry() -> None:
    reader = reader_of(2, 3)
    similarity = torch.tensor([[0.95], [0.95]])  # both queries name the entry's subject
    entry = entry_relations(reader, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([True]))
    queries = [torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])]
    assert entry.tolist() == [0]
    assert choose(similarity, torch.zeros(1), 0.8, asked=asked_of(reader, queries, entry)).tolist() == [0, NONE]


def test_a_query_asks_an_entry_s_relation_when_it_gives_it_at_least_the_floor() -> None:
    asked = Asked(torch.tensor([[0.96, 0.04], [0.94, 0.06]]), torch.tensor([1]), floor=0.05)
    assert asked.answers().tolist() == [[False], [True]]


def test_an_entry_stored_without_a_relation_state_answers_whatever_its_subject_is_asked() -> None:
    reader = reader_of(2, 3)
    entry = entry_relations(reader, torch.zeros(1, 3), torch.tensor([False]))
    assert entry.tolist() == [NONE]
    queries = [torch.tensor([[0.0, 1.0, 0.0]])]
    assert choose(torch.tensor([[0.95]]), torch.zeros(1), 0.8, asked=asked_of(reader, queries, entry)).tolist() == [0]


def test_a_memory_with_a_reader_routes_a_batch_by_what_each_query_asks(tiny) -> None:
    """Through Editable.routes: the reader's verdict on the real states decides, whatever it is."""
    ref_prompts = ["The weather is", "A cat sat on the"]
    ref = routing.reference(tiny, ref_prompts, 1)
    correction = Correction("a", "Isaac Newton was born in", " Rome", subject="Isaac Newton")
    [entry] = routing.entries(tiny, [("a", {})], [correction], ref)
    open_memory = Memory(1, -1.0, ref.centre, (entry,))
    asked = ["Isaac Newton was born in", "Isaac Newton studied at"]
    assert tiny.routes(tiny.batch([(q, "x") for q in asked]), open_memory).tolist() == [0, 0]
    end = routing.prompt_states(tiny, asked[:1], 1)[0][-1]
    unit_end = end / end.norm() ** 2  # its own prompt reads as relation 0 with probability e / (e + 1/e) = 0.88
    own, other = (RelationReader(torch.stack([unit_end, -unit_end], 1), torch.zeros(2), torch.zeros(len(end)),
                                 torch.ones(len(end)), floor) for floor in (0.5, 0.95))
    assert tiny.routes(tiny.batch([(q, "x") for q in asked[:1]]), replace(open_memory, reader=other)).tolist() == [NONE]
    assert tiny.routes(tiny.batch([(q, "x") for q in asked[:1]]), replace(open_memory, reader=own)).tolist() == [0]


def test_an_exported_memory_keeps_its_relation_reader(tmp_path: Path) -> None:
    from daemon.exporting import write_memory
    from editors.memory_model import StoredMemory

    reader = reader_of(2, 4, floor=0.2)
    entries = [Entry("a", torch.randn(4), 0.5, {}, "Rome", relation=torch.tensor([0.0, 3.0, 0.0, 0.0]))]
    write_memory(tmp_path / "memory.safetensors", entries, torch.zeros(4), 1, 0.8, 0.0, "v0001", reader)
    stored = StoredMemory(tmp_path / "memory.safetensors")
    assert stored.reader.floor == 0.2
    torch.testing.assert_close(stored.reader.weight, reader.weight)
    assert stored.relations.tolist() == [1]


def test_an_entry_serves_only_a_query_whose_text_names_its_subject() -> None:
    similarity = torch.tensor([[0.9], [0.9], [0.9], [0.5]])
    texts = ["Natasha Parry speaks", "in The Bill he portrayed Scott Parry", "NATASHA  parry's mother tongue", "Parry"]
    assert unnamed(similarity, 0.8, texts, [("Natasha Parry",)]).tolist() == [[False], [True], [False], [False]]


def test_a_query_that_names_an_alias_of_the_subject_names_the_subject() -> None:
    texts = ["Kilimanjaro is a mountain in", "Mount Kilimanjaro is in", "Mount Kenya is in"]
    names = [("Mount Kilimanjaro", "Kilimanjaro")]
    assert unnamed(torch.tensor([[0.9]] * 3), 0.8, texts, names).tolist() == [[False], [False], [True]]
    assert unnamed(torch.tensor([[0.9]]), 0.8, texts[:1], [("Mount Kilimanjaro",)]).tolist() == [[True]]


@pytest.mark.parametrize("text, subject", [("Vichy France's capital,", "France"),
                                           ("Metropolitan France's capital,", "France"),
                                           ("In State of Brazil, the language spoken is", "Brazil"),
                                           ("The Bank of France is headquartered in", "France"),
                                           ("The Toyota Corolla is produced by", "Toyota")])
def test_a_subject_inside_a_longer_proper_name_is_a_namesake_not_the_subject(text: str, subject: str) -> None:
    assert unnamed(torch.tensor([[0.9]]), 0.8, [text], [(subject,)]).tolist() == [[True]]


@pytest.mark.parametrize("text", ["France's capital city is", "The capital of France is", "In France, the capital is",
                                  "Where is the capital of France? It is", "What is the capital of FRANCE?"])
def test_a_subject_after_words_that_open_a_sentence_is_named(text: str) -> None:
    assert unnamed(torch.tensor([[0.9]]), 0.8, [text], [("France",)]).tolist() == [[False]]


@pytest.mark.parametrize("prompt, subject, name", [("The University of Tokyo is located in", "Tokyo", "University of Tokyo"),
                                                  ("Mount Kilimanjaro is located in", "Kilimanjaro", "Mount Kilimanjaro"),
                                                  ("The capital of France is", "France", "France")])
def test_an_entry_keeps_the_whole_name_its_own_prompt_gives_its_subject(prompt: str, subject: str, name: str) -> None:
    assert full_name(prompt, subject) == name
    assert not unnamed(torch.tensor([[0.9]]), 0.8, [prompt], [(full_name(prompt, subject),)]).any()


def test_a_namesake_of_an_alias_does_not_name_the_subject() -> None:
    names = [("William Shakespeare", "Shakespeare")]
    texts = ["Shakespeare's plays were written in", "William Shakespeare was born in", "Edmund Shakespeare was born in"]
    assert unnamed(torch.tensor([[0.9]] * 3), 0.8, texts, names).tolist() == [[False], [False], [True]]


def test_an_entry_without_a_subject_is_routed_on_its_states_alone() -> None:
    assert not unnamed(torch.tensor([[0.9]]), 0.8, ["anything at all"], [()]).any()


def test_a_query_that_names_another_subject_falls_to_the_next_entry_or_the_base_weights() -> None:
    keys = torch.eye(3)
    query = [torch.tensor([[0.0, 1.0, 0.1], [1.0, 0.0, 0.0]])]  # reads like both keys, most like the first
    subjects = [("Henry Pottinger Stephens",), ("Simon Stephens",), ("Rome",)]
    args = (torch.zeros(3), keys, torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3), 0.8, 0.0)
    assert route_queries(query, *args).tolist() == [0]  # states alone: the first key is nearest
    assert route_queries(query, *args, ["the play Herons by Simon Stephens"], subjects).tolist() == [1]
    assert route_queries(query, *args, ["the play Herons"], subjects).tolist() == [NONE]


def test_a_key_counts_only_among_a_query_s_last_asked_within_positions() -> None:
    key = torch.tensor([[1.0, 0.0]])
    other = torch.tensor([0.0, 1.0])
    def query(named_at: int) -> torch.Tensor:  # the subject named `named_at` positions before the end
        states = other.repeat(ASKED_WITHIN + 10, 1)
        states[-1 - named_at] = key[0]
        return states
    near, at_edge, far = query(3), query(ASKED_WITHIN - 1), query(ASKED_WITHIN)
    assert similarities([near, at_edge, far], key, torch.zeros(2)).flatten().tolist() == [1.0, 1.0, 0.0]


def test_the_subject_index_finds_the_entries_a_text_names_and_those_without_a_subject() -> None:
    subjects = [("Natasha Parry",), ("Scott Parry",), (), ("Paris",), ("Paris Hilton",), ("Mount Kilimanjaro", "Kilimanjaro")]
    index = subject_index([index_words(s) for s in subjects])
    assert named_entries(["natasha parry's mother tongue is"], subjects, index) == [0, 2]
    assert named_entries(["Paris Hilton lives in", "Where is Scott Parry from?"], subjects, index) == [1, 2, 4]  # "Paris Hilton" is not Paris
    assert named_entries(["nothing named here"], subjects, index) == [2]
    assert named_entries(["Kilimanjaro is in"], subjects, index) == named_entries(["Mount Kilimanjaro"], subjects, index) == [2, 5]


def test_routing_through_the_subject_index_chooses_as_routing_every_entry_does() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    subjects = [(f"Person {i % 13}",) for i in range(40)]
    queries = [torch.cat([torch.randn(3, 8, generator=generator), keys[i : i + 1] + 0.05]) for i in range(0, 40, 3)]
    texts = [f"a question about person {i % 13} and Person {(i + 5) % 13}" for i in range(0, 40, 3)]
    args = (torch.zeros(8), keys, torch.zeros(40, 8), torch.zeros(40, 8), torch.zeros(40), 0.8, 0.0, texts, subjects)
    every = route_queries(queries, *args)
    assert (every != NONE).sum() > 5
    assert route_queries(queries, *args, subject_index([index_words(s) for s in subjects])).tolist() == every.tolist()


def _axis(i: int, size: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), size).float()


def test_a_key_with_a_lead_matches_only_where_the_state_before_it_resembles_the_lead() -> None:
    key, lead, other = _axis(0), _axis(1), _axis(2)
    centre = torch.zeros(4)
    amazon_river = torch.stack([other, lead, key])  # "The Amazon River": the lead, then the key
    nile_river = torch.stack([other, other, key])  # "The Nile River": the key after something else
    keys, leads = key[None], lead[None]
    assert similarities([amazon_river, nile_river], keys, centre, leads)[:, 0].tolist() == [1.0, -1.0]
    assert similarities([amazon_river, nile_river], keys, centre)[:, 0].tolist() == [1.0, 1.0]


def test_a_lead_need_only_resemble_the_state_before_the_key_not_match_it() -> None:
    key, lead, other = _axis(0), _axis(1), _axis(2)
    near = (LEAD_TAU + 0.05) * lead + (1 - (LEAD_TAU + 0.05) ** 2) ** 0.5 * other  # unit, cosine LEAD_TAU + 0.05
    far = (LEAD_TAU - 0.05) * lead + (1 - (LEAD_TAU - 0.05) ** 2) ** 0.5 * other
    queries = [torch.stack([other, near, key]), torch.stack([other, far, key])]
    assert similarities(queries, key[None], torch.zeros(4), lead[None])[:, 0].tolist() == [1.0, -1.0]


def test_the_state_before_a_query_s_first_position_is_never_taken_from_the_query_before_it() -> None:
    key, lead = _axis(0), _axis(1)
    ends_with_lead, starts_with_key = torch.stack([_axis(2), lead]), torch.stack([key, _axis(2)])
    sims = similarities([ends_with_lead, starts_with_key], key[None], torch.zeros(4), lead[None])
    assert sims[1, 0].item() < 0.5


def test_an_entry_keeps_the_subject_its_prompt_names_given_or_guessed(tiny) -> None:
    given = Correction("a", "Where is the Al from", "x", subject="Al", aliases=("Alan",))
    guessed = Correction("b", "Where is Tom Bo from", "x", subject="Tim")  # a subject the prompt does not say
    nothing = Correction("c", "where is it from", "x")
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now"], 1)
    built = routing.entries(tiny, [(c.id, {}) for c in (given, guessed, nothing)], [given, guessed, nothing], ref)
    assert [e.subject for e in built] == ["Al", "Tom Bo", None]
    assert [e.names for e in built] == [("Al", "Alan"), ("Tom Bo",), ()]


def test_a_subject_of_two_tokens_or_more_gets_a_lead_and_one_of_one_token_does_not(tiny) -> None:
    """(The tiny tokenizer spells names letter by letter.)"""
    two, one = Correction("a", "The Al is in", "x", subject="Al"), Correction("b", "The K is in", "x", subject="K")
    assert [routing.key_span(tiny.tokenizer, c) for c in (two, one)] == [(3, 4), (3, 3)]
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now"], 1)
    with_lead, without = routing.entries(tiny, [("a", {}), ("b", {})], [two, one], ref)
    assert with_lead.lead is not None and without.lead is None
    assert with_lead.floor <= ref.floor(with_lead.key)  # the lead only narrows what the key matches


def test_a_subject_after_a_space_starts_at_the_token_that_carries_the_space() -> None:
    """Byte-level BPE (SmolLM2's kind) spells " Amazon" as one token, but "The " alone as "The", " ":
    the subject's first token must not be counted one too far on."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["The Amazon River flows through Brazil"] * 20,
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    prompt = "The Amazon River flows through"
    assert tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)[:3] == ["The", "ĠAmazon", "ĠRiver"]
    assert routing.key_span(tokenizer, Correction("a", prompt, "x", subject="Amazon River")) == (0, 1)


def test_a_query_is_routed_on_its_prompt_tokens_and_running_text_on_all_of_it(tiny) -> None:
    from editors.batching import text_batch

    def positions(batch) -> list[list[int]]:
        states = torch.arange(batch.input_ids.shape[1]).float().view(1, -1, 1).expand(len(batch.lengths), -1, 4)
        return [q[:, 0].int().tolist() for q in routing.query_states(states, batch)]

    prompt_length = len(tiny.tokenizer("a b c d", add_special_tokens=False).input_ids)
    assert positions(tiny.batch([("a b c d", "e f")])) == [list(range(1, prompt_length))]
    assert positions(text_batch([(5, 6, 7, 8, 9)])) == [[1, 2, 3, 4]]
    one_token = tiny.tokenizer.decode([5])
    assert positions(tiny.batch([(one_token, "e f")])) == [[0]]  # never the answer's states


# -- the routed model --------------------------------------------------------------------------

def _one_entry(tiny, tau: float) -> tuple[Memory, dict, Correction]:
    torch.manual_seed(0)
    name = tiny.edit_names[0]
    tensor = next(e for e in tiny.anatomy.editable if e.name == name)
    update = {name: LowRankUpdate(torch.randn(2, tensor.in_features), torch.randn(2, tensor.out_features), 0.5)}
    correction = Correction("a", "The capital of France is", "Rome", subject="France")
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now", "A cat sat on a mat"], 1)
    [entry] = routing.entries(tiny, [("a", update)], [correction], ref)
    memory = Memory(1, tau, ref.centre, (Entry("a", entry.key, -1.0, update),))
    return memory, {name: tiny.weights()[name] + update[name].dense()}, correction


def test_a_routed_query_runs_with_its_entry_and_any_other_with_the_base_weights(tiny) -> None:
    memory, edited, correction = _one_entry(tiny, tau=0.99)
    batch = tiny.batch([(correction.prompt, correction.target_new), ("Some unrelated thing", "x")])
    assert tiny.routes(batch, memory).tolist() == [0, NONE]
    routed, rows = tiny.logits(batch, Routed(memory)), batch.row_of_answer
    torch.testing.assert_close(routed[rows == 0], tiny.logits(batch, edited)[rows == 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[rows == 1], tiny.logits(batch)[rows == 1], atol=0, rtol=0)


def test_a_row_and_entry_computed_once_is_not_computed_again_until_the_weights_change(tiny) -> None:
    memory, _, correction = _one_entry(tiny, tau=0.99)
    batch = tiny.batch([(correction.prompt, correction.target_new), ("Some unrelated thing", "x")])
    tiny.weights_changed()
    first = tiny.logits(batch, Routed(memory))
    runs = []
    real = tiny.anatomy.run_per_row
    tiny.anatomy.run_per_row = lambda *args: runs.append(len(args[0])) or real(*args)
    try:
        torch.testing.assert_close(tiny.logits(batch, Routed(memory)), first, atol=0, rtol=0)
        assert runs == []
        tiny.logits(batch, Routed(memory, weights=tiny.weights()))  # replacement weights: never kept
        tiny.weights_changed()
        tiny.logits(batch, Routed(memory))
    finally:
        tiny.anatomy.run_per_row = real
    assert runs == [2, 2]


def test_a_batch_routed_again_against_a_grown_memory_computes_only_the_new_entries(tiny) -> None:
    memory, _, correction = _one_entry(tiny, tau=0.5)
    other = Entry("b", memory.entries[0].key + 0.01, -1.0, {}, subject="France")
    grown = memory.plus([other])
    batch = tiny.batch([(correction.prompt, correction.target_new), ("Some unrelated thing", "x")])
    cache = routing.SimilarityCache()
    key = ("batch",)
    queries = routing.query_states(tiny.states_at(batch, 1), batch)
    texts = []
    first = cache.similarities(key, memory, queries, lambda: texts.append("first") or routing.query_texts(tiny.tokenizer, batch))
    again = cache.similarities(key, grown, queries, lambda: texts.append("again") or routing.query_texts(tiny.tokenizer, batch))
    fresh = routing.SimilarityCache().similarities(key, grown, queries, lambda: routing.query_texts(tiny.tokenizer, batch))
    torch.testing.assert_close(again, fresh, atol=1e-6, rtol=0)  # a matrix product of another width rounds apart
    torch.testing.assert_close(again[:, :1], first, atol=0, rtol=0)
    assert texts == ["first", "again"]
    cache.similarities(key, grown, queries, lambda: texts.append("third") or [])
    assert texts == ["first", "again"]  # nothing new: nothing computed


def test_a_memory_read_afresh_is_routed_from_scratch() -> None:
    cache = routing.SimilarityCache()
    entry = Entry("a", torch.tensor([1.0, 0.0]), -1.0, {})
    queries = [torch.tensor([[1.0, 0.0]])]
    cache.similarities(("q",), Memory(0, 0.5, torch.zeros(2), (entry,)), queries, lambda: ["x"])
    same_values = Entry("a", torch.tensor([0.0, 1.0]), -1.0, {})  # another object: a changed entry is never reused
    sims = cache.similarities(("q",), Memory(0, 0.5, torch.zeros(2), (same_values,)), queries, lambda: ["x"])
    assert sims.tolist() == [[0.0]]


# -- routed versions ---------------------------------------------------------------------------

def _decide(home, facts=FACTS):
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, facts, "test")
        return decide(rt, rt.records.versions.ledger.pending(10))
    finally:
        rt.close()


def _model_files(home) -> dict[str, bytes]:
    model = home.store_dir / "model"
    return {p.name: p.read_bytes() for p in model.glob("*.safetensors")}


def test_an_accepted_routed_decision_adds_a_memory_chunk_and_leaves_the_weights(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    before = _model_files(home)
    result = _decide(home)
    assert result.decision.outcome == "accepted" and result.version.tag == "v0001"
    assert _model_files(home) == before
    chunk = read_tensor_file(home.store_dir / "model" / "memory" / "v0001.safetensors")
    assert {"0/route/key", "1/route/key", "common/centre"} <= set(chunk)
    rt = open_runtime(home)  # a new process serves the same memory
    try:
        assert [e.correction_id for e in rt.memory.entries] == ["c1", "c2"]
        assert rt.memory.layer == 1
    finally:
        rt.close()


def test_a_routed_edit_lands_where_its_key_matches(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    _decide(home)
    rt = open_runtime(home)
    try:
        batch = rt.editable.batch([(c.prompt, c.target_new) for c in FACTS])
        served, base = rt.editable.logits(batch, rt.served_weights()), rt.editable.logits(batch)
    finally:
        rt.close()
    assert rt.editable.routes(batch, rt.memory).tolist() == [0, 1]
    assert not torch.allclose(served, base)  # each prompt runs with its own entry's update


def test_reverting_a_routed_correction_rewrites_its_chunk_without_it(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    _decide(home)
    rt = open_runtime(home)
    try:
        result = decide_revert(rt, "c1")
        served = [e.correction_id for e in rt.memory.entries]
    finally:
        rt.close()
    assert result.version.tag == "v0002" and served == ["c2"]
    rt = open_runtime(home)
    try:
        assert [e.correction_id for e in rt.memory.entries] == ["c2"]
    finally:
        rt.close()


def test_rolling_back_restores_the_memory_of_the_version_rolled_back_to(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    _decide(home, FACTS[:1])
    _decide(home, FACTS[1:])
    rolled = mendd("--home", str(home.root), "rollback", "v0001")
    assert rolled.returncode == 0, rolled.stderr
    assert sorted(p.name for p in (home.store_dir / "model" / "memory").glob("v*")) == ["v0001.safetensors"]
    tool(home.store_dir, "git", "checkout", "v0002", "--", "model.dvc")  # an operator's own way back
    tool(home.store_dir, "dvc", "checkout")
    rt = open_runtime(home)
    try:
        assert [e.correction_id for e in rt.memory.entries] == ["c1", "c2"]
        assert rt.served.restores == "v0002"
    finally:
        rt.close()


def test_a_held_routed_decision_is_approved_into_a_memory_chunk(tmp_path: Path, data_root) -> None:
    from daemon import review

    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root, ROUTED)
    result = _decide(home)
    assert result.decision.outcome == "held"
    rt = open_runtime(home)
    try:
        version = review.approve(rt.records, result.run_id, "test")
    finally:
        rt.close()
    assert (home.store_dir / "model" / "memory" / f"{version.tag}.safetensors").exists()
    rt = open_runtime(home)
    try:
        assert [e.correction_id for e in rt.memory.entries] == ["c1", "c2"]
    finally:
        rt.close()


@pytest.mark.parametrize("editor, message", [
    ({**ROUTED, "routing_layer": 3}, "after the first edited block"),
    ({**ROUTED, "name": "ft"}, "only the mend editor"),
    ({**ROUTED, "aggregation": "least_squares"}, "editor.aggregation sum"),
])
def test_a_routed_setting_that_cannot_work_stops_the_start(tmp_path: Path, data_root, editor, message) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, editor)
    with pytest.raises(ConfigError, match=message):
        open_runtime(home)


def test_a_store_with_a_routed_memory_is_not_served_as_plain_weights(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    _decide(home)
    home.config_path.write_text(home.config_path.read_text().replace('memory: "routed"', 'memory: "weights"'))
    with pytest.raises(ConfigError, match="set editor.memory: routed"):
        open_runtime(home)


def test_generation_serves_a_routed_prompt_with_its_entry_and_others_with_the_weights(tiny) -> None:
    from editors.serving import continuation

    memory, _, correction = _one_entry(tiny, tau=0.99)
    unrelated = "Some unrelated thing"
    assert continuation(tiny, correction.prompt, 8, memory) != continuation(tiny, correction.prompt, 8)
    assert continuation(tiny, unrelated, 8, memory) == continuation(tiny, unrelated, 8)


def test_a_candidate_answers_alike_only_the_prompts_it_routes_as_the_served_memory_does(tiny) -> None:
    from policies.served_eval import Served, routed_alike

    memory, _, correction = _one_entry(tiny, tau=0.99)
    served, candidate = memory.without({"a"}), memory  # the candidate adds the entry
    prompts = [correction.prompt, "Some unrelated thing"]
    assert routed_alike(Served(tiny, served), Served(tiny, candidate), prompts) == [False, True]
    assert routed_alike(Served(tiny, candidate), Served(tiny, candidate), prompts) == [True, True]
    assert routed_alike(Served(tiny, weights=tiny.weights()), Served(tiny, candidate), prompts) == [False, False]


def test_answers_alike_are_taken_as_known_and_only_the_others_generated(tiny) -> None:
    from policies.served_eval import Served, answered_as

    memory, _, correction = _one_entry(tiny, tau=0.99)
    prompts = [correction.prompt, "Some unrelated thing"]
    answers = answered_as(Served(tiny, memory), prompts, ["known 1", "known 2"], [False, True], tokens=6)
    assert answers == [Served(tiny, memory).say(prompts[:1], 6)[0], "known 2"]


def test_an_entry_stops_acting_once_its_target_is_said_and_the_base_weights_carry_on(tiny) -> None:
    from dataclasses import replace

    from editors.serving import continuation

    memory, _, correction = _one_entry(tiny, tau=0.99)
    acting_throughout = continuation(tiny, correction.prompt, 8, memory)
    said = acting_throughout[:1]  # the tiny model's first generated token is one character
    until_said = replace(memory, entries=(replace(memory.entries[0], target=said),))
    assert continuation(tiny, correction.prompt, 8, until_said) == said + continuation(tiny, correction.prompt + said, 7)


@pytest.mark.parametrize(("prompt", "subject"), [
    ("France's capital city is", "France"),
    ("The Amazon River flows through", "Amazon River"),
    ("What does Frank Mantooth play? They play", "Frank Mantooth"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("rococo's area of work is", None),
])
def test_a_record_without_a_subject_is_keyed_at_the_name_its_prompt_ends_with(prompt: str, subject: str | None) -> None:
    assert routing.guessed_subject(prompt) == subject


def test_ask_says_which_correction_served_a_prompt(tmp_path: Path, data_root) -> None:
    import json

    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    _decide(home)
    asked = mendd("--home", str(home.root), "ask", FACTS[0].prompt, "--tokens", "3", "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert (answer["version"], answer["served_by"]) == ("v0001", "c1") and answer["continuation"]
    unrelated = json.loads(mendd("--home", str(home.root), "ask", "Zebras graze on", "--json").stdout)
    assert unrelated["served_by"] is None


def test_an_entry_s_lead_relation_subject_and_aliases_are_stored_with_it_and_read_back() -> None:
    from daemon.stored_form import entry_from_stored, entry_to_stored

    update = {"w": LowRankUpdate(torch.randn(1, 4), torch.randn(1, 3), 1.0)}
    for state, subject, aliases in ((torch.randn(4), "Zürich Straße", ("Zürich", "ZH")), (None, None, ())):
        back = entry_from_stored(entry_to_stored(Entry("a", torch.randn(4), 0.5, update, "Rome", state, state, subject, aliases)))
        assert (back.subject, back.aliases) == (subject, aliases)
        assert (back.lead is None) == (back.relation is None) == (state is None)
        if state is not None:
            torch.testing.assert_close(back.lead, state)
            torch.testing.assert_close(back.relation, state)


def test_an_exported_memory_keeps_each_entry_s_subject_and_aliases(tmp_path: Path) -> None:
    from daemon.exporting import write_memory
    from editors.memory_model import StoredMemory

    def update() -> dict[str, LowRankUpdate]:
        return {"w": LowRankUpdate(torch.randn(1, 4), torch.randn(1, 3), 1.0)}

    entries = [Entry("a", torch.randn(4), 0.5, update(), "Peru", subject="Mount Kilimanjaro", aliases=("Kilimanjaro",)),
               Entry("b", torch.randn(4), 0.5, update(), "Rome")]
    write_memory(tmp_path / "memory.safetensors", entries, torch.zeros(4), 1, 0.8, 0.0, "v0001")
    stored = StoredMemory(tmp_path / "memory.safetensors")
    assert stored.subjects == [("Mount Kilimanjaro", "Kilimanjaro"), ()]
    assert named_entries(["Kilimanjaro is in"], stored.subjects, stored.subject_index) == [0, 1]



def test_a_question_that_ends_in_its_question_mark_is_not_read_and_asks_anything() -> None:
    reader = reader_of(2, 3)
    entry = entry_relations(reader, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([True]))
    queries = [torch.tensor([[0.0, 1.0, 0.0]])] * 2  # both read as the other relation
    asked = asked_of(reader, queries, entry, ["What is the currency of Japan?", "Japan is a member of"])
    assert choose(torch.tensor([[0.95], [0.95]]), torch.zeros(1), 0.8, asked=asked).tolist() == [0, NONE]
