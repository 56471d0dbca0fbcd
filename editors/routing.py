"""A routed memory of edits (the GRACE / WISE idea): the lever that keeps 1,000 edits from adding up.

Summed into the weights, every accepted edit moves some unrelated answers, and the moves add up
until the gate's locality margin is spent. In a routed memory each accepted correction stays its own
low-rank update (an entry) with a key, the base weights never change, and a query runs with the one
update whose key it matches, or with the base weights when it matches none:

- key: the hidden state entering block `layer` at the subject's last prompt token. It is computed
  before any edited block, so routing never depends on the memory itself;
- lead: for a subject of two tokens or more, the state one token before the key as well. The last
  token of "Amazon River" is mostly " River", and alone it matches "The Nile River" and every
  other river; with the lead, a query position counts only where the state before it resembles the
  lead (cosine at least LEAD_TAU, a looser bar than τ: the lead only tells "Amazon" from "Nile");
- similarity: the cosine between the key and a query's token states from position 1 on (position 0
  is an attention sink), both centred by the mean state of held-out prompts; a query takes its best
  position among those its leads let count and that lie among its last ASKED_WITHIN (32): a query asks
  about a subject it names near its end, and running text that named one further back has moved on;
- an entry fires when the similarity reaches both τ and its floor raised by the margin: the floor is
  the best similarity its key reached on held-out unrelated prompts, and the margin a share of the
  way from the floor to 1, so a key that resembles everything must match almost exactly;
- and only when the query's text names the entry's subject (its words, in order, any case; or an
  alias its record gives: "Kilimanjaro" for "Mount Kilimanjaro"), standing alone and not inside a
  longer name ("Vichy France", "State of Brazil", "Toyota Corolla" name other entities; the entry
  keeps the whole name its own prompt gives its subject, `full_name`): states
  of a name's last tokens read alike for namesakes ("Simon Stephens" and "Henry Pottinger
  Stephens", "Scott Parry" and "Natasha Parry"), so running text that names someone else would
  otherwise reach an entry, more often the more entries there are (bench/results/README.md);
- of the entries that fire, the most similar one serves the query.

Measured offline first (bench/routed_memory.py, bench/results/README.md), then built here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from editors.batching import IGNORE, TokenBatch
from editors.compression import CompactUpdate, compact_update, compressed, wide_all
from editors.kept import BytesBudget
from editors.memory_model import (NONE, NOT_NAME_WORDS, Factors, Names, RelationReader, asked_of, choose, entry_names,
                                  entry_relations, full_name, index_words, named_entries, named_similarities,
                                  optional_rows, position_similarities, present_units, prompt_positions, query_ends,
                                  stack_rows, subject_index, unit)
from editors.settings import CacheBudgets, Compression
from editors.types import Correction, LowRankUpdate



@dataclass(frozen=True)
class Entry:
    """One accepted correction in the memory."""

    correction_id: str
    key: torch.Tensor  # [hidden], as the model computes it (not centred)
    floor: float  # its best similarity on held-out unrelated prompts
    update: dict[str, CompactUpdate]  # tensor name -> the correction's own low-rank change (given as LowRankUpdate or compact)
    target: str | None = None  # the answer it teaches; generation drops the entry once it is said
    lead: torch.Tensor | None = None  # [hidden]: the state one token before the key (long subjects)
    relation: torch.Tensor | None = None  # [hidden]: the state at the prompt's last token (tells namesakes apart)
    subject: str | None = None  # what its prompt is about (given or guessed): a query must name it
    aliases: tuple[str, ...] = ()  # other names of the subject (its record's): naming one will do

    def __post_init__(self) -> None:
        # kept compact, whatever it was given: thousands of entries stay in RAM for the process's life
        object.__setattr__(self, "update", {name: compact_update(u) for name, u in self.update.items()})

    @cached_property
    def names(self) -> Names:
        return entry_names(self.subject, self.aliases)

    @cached_property
    def filed_under(self) -> frozenset[str]:
        """Its names' first words, once per entry: each new memory indexes its entries by them."""
        return index_words(self.names)


@dataclass(frozen=True)
class Memory:
    layer: int  # the block whose entering hidden state keys the memory
    tau: float
    centre: torch.Tensor  # [hidden]: mean state of held-out prompts at `layer`
    entries: tuple[Entry, ...] = ()
    margin: float = 0.0  # the share of the way from an entry's floor to 1 a query must also clear
    reader: RelationReader | None = None  # what a query asks: an entry serves only its own question

    @cached_property
    def relations(self) -> torch.Tensor:
        """[entries]: the relation each entry's prompt asks (the reader's), NONE without a reader or state."""
        present = torch.tensor([e.relation is not None for e in self.entries], dtype=torch.bool)
        return entry_relations(self.reader, optional_rows([e.relation for e in self.entries], self.centre.numel()), present)

    def plus(self, entries: list[Entry]) -> "Memory":
        return replace(self, entries=self.entries + tuple(entries))

    def without(self, correction_ids: set[str]) -> "Memory":
        return replace(self, entries=tuple(e for e in self.entries if e.correction_id not in correction_ids))

    @cached_property
    def unit_keys(self) -> torch.Tensor:
        if not self.entries:
            return torch.zeros(0, self.centre.numel())
        return unit(torch.stack([e.key for e in self.entries]), self.centre)

    @cached_property
    def unit_leads(self) -> torch.Tensor:
        """[entries, hidden]: each entry's unit lead, zeros for an entry without one."""
        return self._units([e.lead for e in self.entries])

    @cached_property
    def unit_relations(self) -> torch.Tensor:
        """[entries, hidden]: each entry's unit relation, zeros for an entry stored without one."""
        return self._units([e.relation for e in self.entries])

    def _units(self, rows: list[torch.Tensor | None]) -> torch.Tensor:
        present = torch.tensor([r is not None for r in rows], dtype=torch.bool)
        return present_units(optional_rows(rows, self.centre.numel()), present, self.centre)

    @cached_property
    def floors(self) -> torch.Tensor:
        return torch.tensor([e.floor for e in self.entries])

    @cached_property
    def names(self) -> list[Names]:
        return [e.names for e in self.entries]

    @cached_property
    def subject_index(self) -> dict[str, list[int]]:
        return subject_index([e.filed_under for e in self.entries])


@dataclass(frozen=True)
class Routed:
    """A routed model's weights as Editable.logits takes them: the model's own weights (or
    replacements for some, as a dict of weights), plus for each query the update of the entry it
    routes to."""

    memory: Memory
    weights: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Reference:
    """What routing needs from held-out unrelated prompts at one layer: their mean state (the
    centre) and their centred unit states (for each new key's floor)."""

    layer: int
    centre: torch.Tensor  # [hidden]
    unit_states: torch.Tensor  # [states, hidden]: each prompt's states in turn
    lengths: torch.Tensor  # [prompts]: how many of the states are each prompt's
    prompts: int = 0  # how many prompts gave them

    def floor(self, key: torch.Tensor, lead: torch.Tensor | None = None) -> float:
        keys = unit(key, self.centre)[None]
        leads = unit(lead, self.centre)[None] if lead is not None else torch.zeros_like(keys)
        return position_similarities(self.unit_states.float(), self.lengths, keys, leads).max().item()


# -- routing a batch (the math itself is in editors/memory_model.py, shared with exported models) --

def query_lengths(batch: TokenBatch) -> list[int]:
    """Each row's query length: its prompt's tokens; running text (text_batch) all of it."""
    if batch.running_text:
        return batch.lengths.tolist()
    out = []
    for length, labels in zip(batch.lengths.tolist(), batch.labels):
        answers = (labels != IGNORE).nonzero()
        out.append(answers[0, 0].item() + 1 if len(answers) else length)  # through the prompt's last token
    return out


def query_states(states: torch.Tensor, batch: TokenBatch) -> list[torch.Tensor]:
    """Each row's states a query is routed on: its query's tokens from position 1 (position 0 alone
    for a one-token prompt)."""
    return [prompt_positions(row[:n]) for row, n in zip(states, query_lengths(batch))]


def query_texts(tokenizer, batch: TokenBatch) -> list[str]:
    """Each row's query as text (all of it, position 0 too: a prompt may open with the subject)."""
    return [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(batch.input_ids, query_lengths(batch))]


def chosen_entries(memory: Memory, similarity: torch.Tensor, queries: list[torch.Tensor],
                   texts: Callable[[], list[str]] | None = None) -> torch.Tensor:
    """[queries]: the entry serving each query (NONE: the base weights), from its named similarities
    with the memory's entries (`SimilarityCache`), its states and (`texts`, read only with a reader) its words."""
    if not queries:
        return torch.zeros(0, dtype=torch.long)
    said = texts() if texts is not None and memory.reader is not None else None
    return choose(similarity, memory.floors, memory.tau, memory.margin, memory.unit_keys,
                  query_ends(queries, memory.centre), memory.unit_relations,
                  asked=asked_of(memory.reader, queries, memory.relations, said))


class SimilarityCache:
    """Each batch's named similarities with the entries of the last memory it was routed against.
    A gate routes the same suites decision after decision against a memory that only grew (its
    candidate is the served memory plus new entries, and an accepted candidate is the next served
    memory), so only the new entries' columns are computed, and of those only the entries a query
    names (`named_entries`): the cost of routing a suite stays flat as T grows. Entries are known by
    identity: a memory read afresh from the store starts afresh."""

    def __init__(self, budget_bytes: int = CacheBudgets.similarities):
        # batch key -> ((layer, tau, centre, entries) it was routed against, its similarities); not the
        # memory itself, whose cached unit keys would be kept once per batch
        self._kept = BytesBudget(budget_bytes)

    def similarities(self, key: tuple, memory: Memory, queries: list[torch.Tensor],
                     texts: Callable[[], list[str]]) -> torch.Tensor:
        """[queries, entries]: `queries` (the batch `key` names; `texts` gives their text when needed)
        against every entry of `memory`."""
        seen, sims = self._kept.get(key) or (None, None)
        kept = _shared_prefix(seen, memory) if seen is not None else 0
        out = sims[:, :kept] if kept else torch.zeros(len(queries), 0)
        if kept < len(memory.entries):
            said = texts()
            columns = [j - kept for j in named_entries(said, memory.names, memory.subject_index) if j >= kept]
            fresh = named_similarities(queries, memory.centre, memory.unit_keys[kept:], memory.unit_leads[kept:],
                                       memory.tau, said, memory.names[kept:], columns)
            out = torch.cat([out, fresh], 1)
        self._kept.put(key, ((memory.layer, memory.tau, memory.centre, memory.entries), out), out.nbytes)
        return out

    @property
    def bytes(self) -> int:
        return self._kept.bytes

    def clear(self) -> None:
        self._kept.clear()


def _shared_prefix(seen: tuple, memory: Memory) -> int:
    """How many leading entries `memory` shares with the memory `seen` describes (the same objects,
    routed at the same layer, τ and centre)."""
    layer, tau, centre, entries = seen
    if layer != memory.layer or tau != memory.tau or centre is not memory.centre:
        return 0
    count = 0
    for old, new in zip(entries, memory.entries):
        if old is not new:
            break
        count += 1
    return count


def row_factors(memory: Memory, chosen: torch.Tensor) -> Factors:
    """Per edited tensor, the chosen entries' factors stacked per row and zero-padded to one rank:
    inputs [batch, rank, in] and outputs·scale [batch, rank, out]; a row served by no entry gets zeros.
    The entries' compact factors are widened here, for this pass only."""
    rows: list[dict | None] = [{} if j != NONE else None for j in chosen.tolist()]
    used = [(row, name, u) for row, j in enumerate(chosen.tolist()) if j != NONE
            for name, u in memory.entries[j].update.items()]
    inputs = wide_all([u.compact_inputs for _, _, u in used])
    outputs = wide_all([u.compact_outputs for _, _, u in used])
    for (row, name, u), inputs_, outputs_ in zip(used, inputs, outputs):
        rows[row][name] = (inputs_, outputs_ * u.scale)
    return stack_rows(rows)


_WORD = re.compile(r"\w[\w'’\-]*")


def guessed_subject(prompt: str) -> str | None:
    """The entity a prompt is about, when the record does not say: its last run of capitalised (or
    digit-led, or camel-case) words that are not pronouns or sentence openers, without a trailing
    possessive. On CounterFact val it ends where the given subject ends in 96.8% of prompts and
    rephrasings (most misses stop early inside the name: "BBC" of "BBC One"); None when the prompt
    names nothing ("rococo's area of work is")."""
    spans: list[list[int]] = []
    for match in _WORD.finditer(prompt):
        word = match.group(0)
        named = (word[0].isupper() or word[0].isdigit() or any(c.isupper() for c in word[1:])) and word.lower() not in NOT_NAME_WORDS
        if not named:
            continue
        if spans and prompt[spans[-1][1] : match.start()] in (" ", "-"):
            spans[-1][1] = match.end()
        else:
            spans.append([match.start(), match.end()])
    if not spans:
        return None
    start, end = spans[-1]
    return re.sub(r"('s|’s|')$", "", prompt[start:end])


def named_subject(correction: Correction) -> str | None:
    """What a correction's prompt is about: its given subject where the prompt says it, else guessed."""
    if correction.subject and correction.subject in correction.prompt:
        return correction.subject
    return guessed_subject(correction.prompt)


def key_span(tokenizer, correction: Correction) -> tuple[int, int]:
    """Where a correction's subject (`named_subject`) lies among its query states (counted from
    position 1, so a subject that opens the prompt starts at -1): its first and last token; the
    prompt's last token alone when it names nothing. The key is read at the last."""
    prompt, subject = correction.prompt, named_subject(correction)
    if subject is None:
        start = end = len(prompt)
    else:  # a guessed subject is the prompt's last run of names
        start = prompt.index(subject) if subject == correction.subject else prompt.rindex(subject)
        end = start + len(subject)

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    whole = tokens(prompt)
    # The subject's first token is the first one the prompt does not share with the text before it:
    # counting that text's tokens would count a dangling space ("The " is "The", " ") that the
    # prompt itself spells as part of the subject (" Amazon").
    before = tokens(prompt[:start])
    shared = next((i for i, (a, b) in enumerate(zip(before, whole)) if a != b), min(len(before), len(whole)))
    last = max(len(tokens(prompt[:end])) - 2, 0)
    return min(shared - 1, last), last


# -- building entries (runs the model's prefix) --------------------------------------------------

def prompt_states(editable, prompts: list[str], layer: int, chunk: int = 64) -> list[torch.Tensor]:
    """Each prompt's states entering block `layer`, from position 1 (as queries are routed)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), chunk):
        batch = editable.batch([(p, "x") for p in prompts[start : start + chunk]])
        with torch.no_grad():
            out.extend(query_states(editable.states_at(batch, layer), batch))
    return out


def reference(editable, prompts: list[str], layer: int) -> Reference:
    """The centre and held-out unit states for `layer`, from prompts known to be unrelated."""
    rows = prompt_states(editable, prompts, layer)
    states = torch.cat(rows)
    centre = states.mean(0)
    return Reference(layer, centre, unit(states, centre), torch.tensor([len(r) for r in rows]), len(prompts))


def entries(editable, shares: list[tuple[str, dict[str, LowRankUpdate]]], corrections: list[Correction],
            ref: Reference, how: Compression | None = None) -> list[Entry]:
    """Memory entries for a delta's per-correction updates: each one's key and floor; compressed
    when `how` says so."""
    by_id = {c.id: c for c in corrections}
    ordered = [by_id[cid] for cid, _ in shares]
    states = prompt_states(editable, [c.prompt for c in ordered], ref.layer)
    out = []
    for (cid, update), correction, row in zip(shares, ordered, states):
        first, last = key_span(editable.tokenizer, correction)
        last = min(last, len(row) - 1)
        key = row[last].clone()
        lead = row[last - 1].clone() if last - 1 >= max(first, 0) else None
        subject = named_subject(correction)
        out.append(Entry(cid, key, ref.floor(key, lead), update, correction.target_new, lead, row[-1].clone(),
                         subject and full_name(correction.prompt, subject), correction.aliases))
    return [kept_as(entry, ref, how) for entry in out] if how is not None else out


def kept_as(entry: Entry, ref: Reference, how: Compression) -> Entry:
    """`entry` as a compressed memory keeps it: its factors as `how` says (editors/compression.py),
    its key, lead and relation in float16 (routing cannot tell), its floor from those."""
    def half(state: torch.Tensor | None) -> torch.Tensor | None:
        return state.half().float() if state is not None else None

    key, lead = half(entry.key), half(entry.lead)
    return replace(entry, key=key, lead=lead, relation=half(entry.relation), floor=ref.floor(key, lead),
                   update={name: compressed(change.widened(), how) for name, change in entry.update.items()})
