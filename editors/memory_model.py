"""A routed memory as it answers, in one file that needs only torch, safetensors and transformers.

mendd routes and generates with these functions, and `mendd export` copies this file verbatim
beside an exported model as its modeling file (`trust_remote_code`): a process with plain
transformers and no mendd then answers exactly as mendd serves that version. Nothing here may
import mendd.

- routing: a query's token states (entering block `layer`, from position 1) against each entry's key,
  centred and compared by cosine, counting only positions whose previous state resembles the entry's
  lead (the state one token before the key) where it has one; an entry serves when the similarity
  clears both τ and its floor raised by a margin (see editors/routing.py); of entries about one
  subject (near-identical keys), the one whose relation is nearest the query's end serves; a key
  counts only where the query names the subject near its end (ASKED_WITHIN);
- an entry adds its low-rank change (x·inputsᵀ·outputs) to the edited tensors' outputs until the
  answer has said its target, or starts to repeat itself; the base weights then re-read the answer
  so far and carry on.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

NONE = -1  # a query that no entry serves
# The least cosine between a lead and the state before a matching key position. Looser than τ: the
# lead tells "Amazon River" from "Nile River", and the same subject reads a little differently after
# other words. Chosen on CounterFact val[0:500] (bench/routing_precision.py).
LEAD_TAU = 0.6
# Eligible entries whose keys are at least this similar to the chosen one's name the same subject
# (corrections about one entity: "Messi plays for", "Messi's nationality is"); the one whose
# relation (the state at its prompt's last token) is nearest the query's then serves.
SAME_SUBJECT = 0.9
# A query asks about a subject it names near its end: in CounterFact, zsRE and MQuAKE prompts,
# rephrasings and questions the subject's last token lies at most 12 tokens before the query's
# (bench/results/README.md). Running text that named a subject further back has moved on to something
# else ("... 2010) Guinness World Records ..." 56 tokens before the chunk ends on a wrestling title), and
# an entry serving it changes text it has nothing to say about.
ASKED_WITHIN = 32
MEMORY_FILE = "memory.safetensors"
# A subject's names: the one its prompt says (given or guessed), then the aliases its record gives;
# empty when the prompt names nothing.
Names = tuple[str, ...]


# -- routing (pure) -----------------------------------------------------------------------------

def unit(states: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    centred = states - centre
    return centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def optional_rows(rows: list[torch.Tensor | None], hidden: int) -> torch.Tensor:
    """[entries, hidden]: the rows stacked (float32), zeros where an entry has none."""
    return torch.stack([r.float() if r is not None else torch.zeros(hidden) for r in rows]) if rows else torch.zeros(0, hidden)


def present_units(rows: torch.Tensor, present: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """[entries, hidden]: each present row as a unit vector, zeros for an entry without one (a lead
    or relation it does not have)."""
    return torch.where(present[:, None], unit(rows, centre), 0.0)


def previous(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[positions, hidden]: each position's predecessor in its own sequence (`states` holds the
    sequences of `lengths` one after another); zeros at a sequence's first position."""
    before = torch.roll(states, 1, 0)
    before[torch.cumsum(lengths, 0) - lengths] = 0
    return before


def position_similarities(unit_states: torch.Tensor, lengths: torch.Tensor, unit_keys: torch.Tensor,
                          unit_leads: torch.Tensor) -> torch.Tensor:
    """[positions, keys]: each position's cosine with each key; -1 for a key with a lead (a non-zero
    row of `unit_leads`) where the previous position's cosine with the lead is under LEAD_TAU."""
    own = unit_states @ unit_keys.T
    has_lead = unit_leads.abs().sum(-1) > 0
    if not has_lead.any():
        return own
    vetoed = has_lead & (previous(unit_states, lengths) @ unit_leads.T < LEAD_TAU)
    return torch.where(vetoed, torch.tensor(-1.0), own)


def near_end(lengths: torch.Tensor) -> torch.Tensor:
    """[positions]: whether each position of the sequences of `lengths` (one after another) is one of
    its sequence's last ASKED_WITHIN."""
    ends = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
    return ends - torch.arange(len(ends)) <= ASKED_WITHIN


def similarities(queries: list[torch.Tensor], unit_keys: torch.Tensor, centre: torch.Tensor,
                 unit_leads: torch.Tensor | None = None) -> torch.Tensor:
    """[queries, keys]: each key's best similarity with a query's token states ([positions, hidden])
    among its last ASKED_WITHIN (earlier ones still serve as the leads' predecessors)."""
    if not queries:
        return torch.zeros(0, len(unit_keys))
    lengths = torch.tensor([len(q) for q in queries])
    owner = torch.repeat_interleave(torch.arange(len(queries)), lengths)
    leads = torch.zeros_like(unit_keys) if unit_leads is None else unit_leads
    per_position = position_similarities(unit(torch.cat(queries), centre), lengths, unit_keys, leads)
    per_position = torch.where(near_end(lengths)[:, None], per_position, torch.tensor(-1.0))
    return torch.full((len(queries), len(unit_keys)), -2.0).scatter_reduce(
        0, owner.unsqueeze(1).expand_as(per_position), per_position, reduce="amax")


def unnamed(similarity: torch.Tensor, tau: float, texts: list[str], subjects: list[Names]) -> torch.Tensor:
    """[queries, entries]: the pairs whose similarity reaches τ but whose query's text does not name
    the entry's subject (`names`). A key reads the subject's last tokens, so a namesake's surname or
    a number passes for it ("Scott Parry" for "Natasha Parry", "140" for "Corolla E140"); the words
    themselves tell them apart. Only pairs that reach τ are read: a query names few of the memory's
    subjects."""
    out = torch.zeros(similarity.shape, dtype=torch.bool)
    read: dict[int, list[str]] = {}
    for query, entry in (similarity >= tau).nonzero().tolist():
        out[query, entry] = not names(read.setdefault(query, cased_words(texts[query])), subjects[entry])
    return out


# Capitalised words that name nothing: sentence openers, pronouns, question words, chat roles. Neither
# part of a name (`standalone`) nor a guessed subject (editors/routing.guessed_subject).
NOT_NAME_WORDS = frozenset(
    "the a an in on of at by for with from to and as is was are were what which who whom whose where when why how "
    "his her its their this that these those it they he she we you i my our your there one people category "
    "references about after before but can could did do does had has have if or so then will would please tell "
    "name q question answer user assistant".split())


def names(text_words: list[str], subject: Names) -> bool:
    """Whether a text (its `cased_words`) names a subject: the words of one of its names, in order
    (any case), standing alone. A capitalised word joined to the mention ("Vichy France",
    "Metropolitan France", "Toyota Corolla"), or a capitalised word and "of" before it ("State of
    Brazil", "Bank of France"), makes it part of another entity's name; words that open a sentence
    (NOT_NAME_WORDS) do not. An entry stored without a subject (or with names of no words) is
    routed on its states alone: any text names it."""
    wordy = [name for name in subject if first_word(name)]
    return not wordy or any(standalone(text_words, start, end) for name in wordy
                            for start, end in mentions_of(text_words, words(name)))


def mentions_of(text_words: list[str], name_words: list[str]) -> list[tuple[int, int]]:
    """Where `name_words` (lower-cased) occur among `text_words` (any case), in order: (start, end) spans."""
    lowered = [w.lower() for w in text_words]
    size = len(name_words)
    return [(start, start + size) for start in range(len(lowered) - size + 1)
            if size and lowered[start:start + size] == name_words]


def standalone(text_words: list[str], start: int, end: int) -> bool:
    """Whether the mention text_words[start:end] is a name of its own, not part of a longer one."""
    return widened(text_words, start, end) == (start, end)


def widened(text_words: list[str], start: int, end: int) -> tuple[int, int]:
    """The mention text_words[start:end] widened over the name words joined to it: capitalised
    words (not NOT_NAME_WORDS) either side, and "<Name> of" before it."""
    def name_word(at: int) -> bool:
        return 0 <= at < len(text_words) and text_words[at][:1].isupper() and text_words[at].lower() not in NOT_NAME_WORDS
    while True:
        if name_word(start - 1):
            start -= 1
        elif start >= 2 and text_words[start - 1] == "of" and name_word(start - 2):
            start -= 2
        elif name_word(end):
            end += 1
        else:
            return start, end


def full_name(text: str, subject: str) -> str:
    """`subject` as `text` names it: its first mention widened over the name words joined to it, so
    that an entry's own prompt names its subject standalone ("University of Tokyo" where the guess
    was "Tokyo", "Mount Kilimanjaro" for "Kilimanjaro"); `subject` itself where the text does not name it."""
    text_words = cased_words(text)
    found = mentions_of(text_words, words(subject))
    if not found:
        return subject
    first, last = widened(text_words, *found[0])
    return " ".join(text_words[first:last])


def first_word(name: str | None) -> str:
    """A name's first word, as `spelled` would give it; "" for none."""
    found = words(name) if name else []
    return found[0] if found else ""


def entry_names(subject: str | None, aliases: list[str] | tuple[str, ...]) -> Names:
    """An entry's names: its subject, then its aliases (aliases alone when the prompt names nothing)."""
    return tuple(name for name in (subject, *aliases) if name)


def index_words(subject: Names) -> frozenset[str]:
    """The words `subject_index` files a subject under: each of its names' first word ("" for none)."""
    return frozenset({first_word(name) for name in subject} - {""} or {""})


def subject_index(filed_under: list[frozenset[str]]) -> dict[str, list[int]]:
    """Entries by their names' first words (`index_words`): which entries a query's words can name."""
    index: dict[str, list[int]] = {}
    for entry, found in enumerate(filed_under):
        for word in found:
            index.setdefault(word, []).append(entry)
    return index


def named_entries(texts: list[str], subjects: list[Names], index: dict[str, list[int]]) -> list[int]:
    """The entries whose subject one of `texts` names, and those without one: the only entries
    routing can choose. Found from the texts' words (`index`), so the cost does not grow with the
    memory, only with the entries the texts name."""
    found = set(index.get("", ()))
    for text in texts:
        text_words = cased_words(text)
        for word in {w.lower() for w in text_words}:
            found.update(entry for entry in index.get(word, ()) if names(text_words, subjects[entry]))
    return sorted(found)


def choose(similarity: torch.Tensor, floors: torch.Tensor, tau: float, margin: float = 0.0,
           unit_keys: torch.Tensor | None = None, ends: torch.Tensor | None = None,
           unit_relations: torch.Tensor | None = None, relation_tau: float | None = None,
           asked: "Asked | None" = None) -> torch.Tensor:
    """Per query, the most similar entry among those whose similarity reaches both τ and the entry's
    own floor raised by `margin` of the way to 1; NONE when none does. Given what each query asks and
    what each entry answers (`asked`), an entry serves no query that asks another question of its
    subject. Given the entries' `unit_keys`
    and `unit_relations` and the queries' `ends` (each one's last state, centred unit), an entry that
    shares its subject with other eligible ones (SAME_SUBJECT) gives way to the one of them whose
    relation is nearest the query's end; given `relation_tau` too, an entry whose relation is further
    than that from the query's end serves it not at all (it asks another question of the subject).
    Keys and relations are compared for eligible pairs only: a query reaches few entries of a memory
    that may hold many."""
    n = similarity.shape[0]
    if similarity.shape[1] == 0:
        return torch.full((n,), NONE)
    eligible = similarity >= torch.clamp(floors + margin * (1 - floors), min=tau)
    if asked is not None:
        eligible &= asked.answers()
    if relation_tau is not None and ends is not None and unit_relations is not None:
        rows, cols = eligible.nonzero(as_tuple=True)
        has_relation = unit_relations[cols].abs().sum(-1) > 0
        other_question = has_relation & ((ends[rows] * unit_relations[cols]).sum(-1) < relation_tau)
        eligible[rows[other_question], cols[other_question]] = False
    score, best = torch.where(eligible, similarity, torch.tensor(-3.0)).max(1)
    chosen = torch.where(score > -3.0, best, torch.tensor(NONE))
    if unit_keys is None or ends is None or unit_relations is None:
        return chosen
    rows, cols = eligible.nonzero(as_tuple=True)
    namesake = (unit_keys[best[rows]] * unit_keys[cols]).sum(-1) >= SAME_SUBJECT
    rows, cols = rows[namesake], cols[namesake]
    # the similarity breaks ties (entries stored without a relation have 0 there)
    nearness = (ends[rows] * unit_relations[cols]).sum(-1) + 1e-3 * similarity[rows, cols]
    nearest_value = torch.full((n,), -3.0).scatter_reduce(0, rows, nearness, reduce="amax")
    at_nearest = nearness == nearest_value[rows]
    nearest = torch.full((n,), similarity.shape[1]).scatter_reduce(0, rows[at_nearest], cols[at_nearest], reduce="amin")
    several = torch.bincount(rows, minlength=n) > 1
    return torch.where((chosen != NONE) & several, nearest, chosen)


# -- the question a query asks (pure) ---------------------------------------------------------------

@dataclass(frozen=True)
class RelationReader:
    """Which relation (question) a text asks, read from its last state entering the routing block: a
    multinomial logistic regression trained on relation templates, CounterFact and known facts
    (bench/relation_reader.py). A key says who a query is about; this says what it asks, so the entry
    for "Isaac Newton was born in" does not answer "Isaac Newton studied at"."""

    weight: torch.Tensor  # [hidden, classes]
    bias: torch.Tensor  # [classes]
    mean: torch.Tensor  # [hidden]: the features' standardization
    scale: torch.Tensor  # [hidden]
    floor: float  # the least probability of an entry's relation at which a query still asks it

    def probabilities(self, states: torch.Tensor) -> torch.Tensor:
        """[texts, classes]: each relation's probability, from the texts' last states [texts, hidden]."""
        return torch.softmax(((states.float() - self.mean) / self.scale) @ self.weight + self.bias, -1)

    def relations(self, states: torch.Tensor) -> torch.Tensor:
        """[texts]: the relation each text asks most likely."""
        return self.probabilities(states).argmax(-1) if len(states) else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class Asked:
    """What each query asks ([queries, classes], the reader's probabilities) beside what each entry
    answers ([entries], its prompt's relation; NONE for an entry stored without a relation state),
    and the floor below which a query asks something else."""

    queries: torch.Tensor
    entries: torch.Tensor
    floor: float

    def answers(self) -> torch.Tensor:
        """[queries, entries]: whether each entry answers what each query asks; an entry without a
        relation answers anything, as before the reader."""
        if self.entries.numel() == 0:
            return torch.ones(len(self.queries), 0, dtype=torch.bool)
        asked = self.queries[:, self.entries.clamp(min=0)] >= self.floor
        return asked | (self.entries < 0)[None]


READER_PARTS = ("weight", "bias", "mean", "scale")


def reader_from(tensors: dict[str, torch.Tensor], floor: float, prefix: str = "") -> RelationReader | None:
    """The reader whose parts `tensors` holds under `prefix` (None when it holds none), at `floor`."""
    if f"{prefix}weight" not in tensors:
        return None
    return RelationReader(*(tensors[prefix + part].float() for part in READER_PARTS), floor)


def reader_tensors(reader: RelationReader, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + part: getattr(reader, part).float().contiguous() for part in READER_PARTS}


def is_question(text: str) -> bool:
    """A text asked as a question that ends in its question mark (zsRE's, a chat's: "What is the
    currency of Japan?"). The relation reader learnt from texts that end where the answer begins ("The
    currency of Japan is the") and reads every such question as one class, so it does not read them."""
    return text.rstrip().endswith("?")


def asked_of(reader: RelationReader | None, queries: list[torch.Tensor], entry_relations: torch.Tensor,
             texts: list[str] | None = None) -> Asked | None:
    """What `queries` (their routed states; `texts`, their words) ask of entries answering
    `entry_relations`; None without a reader. A question (`is_question`), which the reader does not
    read, asks anything: the entry serves it as before the reader."""
    if reader is None or not queries:
        return None
    probabilities = reader.probabilities(torch.stack([q[-1] for q in queries]))
    if texts is not None:
        probabilities[torch.tensor([is_question(t) for t in texts], dtype=torch.bool)] = 1.0
    return Asked(probabilities, entry_relations, reader.floor)


def entry_relations(reader: RelationReader | None, relations: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[entries]: the relation each entry's prompt asks (from its relation state), NONE where it has none."""
    if reader is None or len(relations) == 0:
        return torch.full((len(relations),), NONE)
    return torch.where(present, reader.relations(relations), torch.tensor(NONE))


def named_similarities(queries: list[torch.Tensor], centre: torch.Tensor, unit_keys: torch.Tensor,
                       unit_leads: torch.Tensor, tau: float, texts: list[str] | None = None,
                       subjects: list[Names] | None = None, columns: list[int] | None = None) -> torch.Tensor:
    """[queries, keys]: `similarities`, with -1 where a query's text does not name the entry's
    subject (given `texts` and `subjects`: `unnamed`). Given `columns` (`named_entries`), only those
    keys are compared and the rest get -1: no query could be routed to them."""
    if columns is None:
        sims = similarities(queries, unit_keys, centre, unit_leads)
    else:
        sims = torch.full((len(queries), len(unit_keys)), -1.0)
        if columns:
            picked = torch.tensor(columns)
            sims[:, picked] = similarities(queries, unit_keys[picked], centre, unit_leads[picked])
    if texts is None or subjects is None:
        return sims
    return torch.where(unnamed(sims, tau, texts, subjects), torch.tensor(-1.0), sims)


def query_ends(queries: list[torch.Tensor], centre: torch.Tensor) -> torch.Tensor:
    """[queries, hidden]: each query's last state, centred unit: what it asks (against relations)."""
    return unit(torch.stack([q[-1] for q in queries]), centre)


def route_queries(queries: list[torch.Tensor], centre: torch.Tensor, unit_keys: torch.Tensor,
                  unit_leads: torch.Tensor, unit_relations: torch.Tensor, floors: torch.Tensor, tau: float,
                  margin: float, texts: list[str] | None = None, subjects: list[Names] | None = None,
                  index: dict[str, list[int]] | None = None, relation_tau: float | None = None,
                  reader: RelationReader | None = None, relations: torch.Tensor | None = None) -> torch.Tensor:
    """[queries]: the entry serving each query (its states, [positions, hidden]), or NONE. Given the
    queries' `texts` and the entries' `subjects`, an entry serves only a query that names its
    subject; given their `index` too (`subject_index`), only those entries are compared; given a
    `reader` and the entries' `relations` (`entry_relations`), only entries that answer what it asks."""
    if not queries:
        return torch.zeros(0, dtype=torch.long)
    columns = named_entries(texts, subjects, index) if texts is not None and subjects is not None and index is not None else None
    sims = named_similarities(queries, centre, unit_keys, unit_leads, tau, texts, subjects, columns)
    asked = asked_of(reader, queries, relations, texts) if relations is not None else None
    return choose(sims, floors, tau, margin, unit_keys, query_ends(queries, centre), unit_relations, relation_tau, asked)


def prompt_positions(states: torch.Tensor) -> torch.Tensor:
    """The states a prompt ([positions, hidden], unpadded) is routed on: from position 1 (position 0
    is an attention sink), position 0 alone for a one-token prompt."""
    return states[1:] if len(states) > 1 else states[:1]


# -- reading the answer (pure) --------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def cased_words(text: str) -> list[str]:
    """`words` as written: a capital tells a name's words from the rest (`names`)."""
    return _WORD.findall(text)


def bare_words(text: str) -> list[str]:
    """`words` without the punctuation."""
    return [w for w in words(text) if re.match(r"\w", w)]


def spelled(text: str) -> str:
    """`text` as `mentions` compares it: its words, lower-cased, one space between, one either side."""
    return f" {' '.join(words(text))} "


def mentions(text: str, target: str) -> bool:
    return bool(words(target)) and spelled(target) in spelled(text)


def starts_running_away(text: str) -> bool:
    """The first sign of a runaway answer: it ends with the same one, two or three words twice
    over ("Entertainment Entertainment", "University of University of")."""
    tokens = bare_words(text)
    return any(len(tokens) >= 2 * k and tokens[-k:] == tokens[-2 * k : -k] for k in (1, 2, 3))


def done_with(answer: str, target: str) -> bool:
    """An entry's work on an answer is done once the answer has said its target, or starts to
    repeat itself: where the target is not coming (a chat answer that restates the question first),
    an entry left on pushes the same words again and again."""
    return mentions(answer, target) or starts_running_away(answer)


# -- an entry's change --------------------------------------------------------------------------

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor name -> inputs [batch, rank, in], outputs [batch, rank, out]


def stack_rows(updates: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None]) -> Factors:
    """Per edited tensor, each row's (inputs [rank, in], outputs·scale [rank, out]) stacked and
    zero-padded to one rank; a row with no update (None) gets zeros."""
    names = sorted({name for update in updates if update for name in update})
    out = {}
    for name in names:
        pairs = [update.get(name) if update else None for update in updates]
        some = next(p for p in pairs if p is not None)
        rank = max(len(p[0]) for p in pairs if p is not None)
        inputs = torch.zeros(len(pairs), rank, some[0].shape[1])  # float32, whatever the stored factors are
        outputs = torch.zeros(len(pairs), rank, some[1].shape[1])
        for row, pair in enumerate(pairs):
            if pair is not None:
                inputs[row, : len(pair[0])], outputs[row, : len(pair[1])] = pair
        out[name] = (inputs, outputs)
    return out


def _adds_low_rank(inputs: torch.Tensor, outputs: torch.Tensor):
    def hook(_module, args, output):
        return output + torch.einsum("bsk,bko->bso", torch.einsum("bsi,bki->bsk", args[0], inputs), outputs)
    return hook


@contextmanager
def adding(modules: dict[str, nn.Module], factors: Factors) -> Iterator[None]:
    """While inside, each named tensor's module adds its row's low-rank change to its output."""
    handles = [modules[name].register_forward_hook(_adds_low_rank(*pair)) for name, pair in factors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tensor_modules(model: nn.Module, names) -> dict[str, nn.Module]:
    """Each tensor name's module ("model.layers.27.mlp.up_proj.weight" -> its up_proj)."""
    return {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in names}


# -- generation ----------------------------------------------------------------------------------

def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row of `logits` [batch, vocab]: the argmax at temperature 0, else a sample
    from softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _forward(model, step: torch.Tensor, mask: torch.Tensor, cache):
    """One pass over the new tokens `step` of a left-padded batch whose attention mask is `mask`."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1]:]
    return model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)


def generate_steps(model, decode, modules: dict[str, nn.Module], ids: torch.Tensor, mask: torch.Tensor,
                   factors: Factors, until: list[str | None], tokens: int, eos: int | None, pad: int,
                   temperature: float = 0.0, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Each step's next token per row of the left-padded `ids` ([batch]), up to `tokens` steps or
    until every row has said end-of-sequence (a finished row gets `pad` after it). A row with an
    entry's change (`factors`) keeps it until `done_with` its target (`until`; `decode` turns a
    row's generated ids into text); from then on the base weights carry on, having re-read the
    row's text so far. `model` is the model's own forward, without routing: the changes it runs
    with are the hooks on `modules` that this loop adds."""
    n = len(ids)
    factors = {name: (inputs.clone(), outputs) for name, (inputs, outputs) in factors.items()}
    until = list(until)
    generated = torch.zeros(n, 0, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    cache, step = None, ids
    for _ in range(tokens):
        with torch.inference_mode(), adding(modules, factors):
            out = _forward(model, step, mask, cache)
        following = torch.where(finished, pad, pick(out.logits[:, -1], temperature, generator))
        generated = torch.cat([generated, following[:, None]], 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], 1)
        if eos is not None:
            finished |= following == eos
        yield following
        if finished.all():
            return
        cache, step = out.cache, following[:, None]
        said = [row for row, target in enumerate(until) if target is not None and done_with(decode(generated[row]), target)]
        for row in said:
            until[row] = None
            for inputs, _ in factors.values():
                inputs[row].zero_()  # the hooks read these factors: the row's entry stops here
        if said:
            # The base weights read these rows' text so far afresh, so what follows the target is
            # what the unedited model says after the prompt and the target.
            with torch.inference_mode():
                read = _forward(model, torch.cat([ids, generated[:, :-1]], 1)[said], mask[said, :-1], None).cache
                for layer, fresh in zip(cache.layers, read.layers):
                    layer.keys[said], layer.values[said] = fresh.keys, fresh.values


# -- a stored memory -----------------------------------------------------------------------------

def last_user_message(tokenizer, text: str) -> str:
    """The last user message of a chat rendered by `tokenizer`'s chat template (what a chat is
    routed on: keys are read from plain prompts); `text` itself when it is not such a chat."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    one = render([{"role": "user", "content": "\x00"}])
    opening, closing = one.split("\x00")
    turns = render([{"role": "user", "content": "\x01"}, {"role": "assistant", "content": "\x02"},
                    {"role": "user", "content": "\x00"}])
    between = turns[turns.index("\x02") + 1 : turns.index("\x00")]
    if not text.endswith(closing):
        return text
    body = text[: len(text) - len(closing)]
    if between in body:
        return body.rsplit(between, 1)[1]
    return body[len(opening):] if body.startswith(opening) else text


class StoredMemory:
    """An exported routed memory: keys, leads, floors, targets, subjects and each entry's factors."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        self.layer, self.tau, self.margin = int(meta["layer"]), float(meta["tau"]), float(meta["margin"])
        self.version = meta.get("version")
        self.correction_ids: list[str] = json.loads(meta["correction_ids"])
        self.targets: list[str | None] = json.loads(meta["targets"])
        # exported before subjects (or aliases) were kept: routed on states alone (or on the subject alone)
        subjects = json.loads(meta.get("subjects", "null")) or [None] * len(self.targets)
        aliases = json.loads(meta.get("aliases", "null")) or [[]] * len(self.targets)
        self.subjects: list[Names] = [entry_names(s, a) for s, a in zip(subjects, aliases)]
        self.subject_index = subject_index([index_words(n) for n in self.subjects])
        self.centre, self.floors = tensors["centre"], tensors["floors"]
        self.unit_keys = unit(tensors["keys"], self.centre)
        self.unit_leads = present_units(tensors["leads"], tensors["has_lead"].bool(), self.centre)
        self.unit_relations = present_units(tensors["relations"], tensors["has_relation"].bool(), self.centre)
        # exported before the relation reader: entries answer whatever their subject is asked
        self.reader = reader_from(tensors, float(meta.get("relation_floor", 0)), "reader/")
        self.relations = entry_relations(self.reader, tensors["relations"], tensors["has_relation"].bool())
        self.updates: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.correction_ids]
        for key, tensor in tensors.items():
            if key.count("/") == 2:
                index, name, part = key.split("/")
                pair = self.updates[int(index)].setdefault(name, [None, None])
                pair[0 if part == "inputs" else 1] = tensor
        self.updates = [{name: tuple(pair) for name, pair in update.items()} for update in self.updates]

    def route(self, states: list[torch.Tensor], texts: list[str]) -> list[int]:
        """Each query's entry (NONE: the base weights), from its states entering `layer` and its text."""
        if not self.correction_ids:
            return [NONE] * len(states)
        return route_queries([prompt_positions(s) for s in states], self.centre, self.unit_keys, self.unit_leads,
                             self.unit_relations, self.floors, self.tau, self.margin, texts, self.subjects,
                             self.subject_index, reader=self.reader, relations=self.relations).tolist()


def _routed_class():
    """The exported model's class: the base Llama with the memory routed as mendd routes it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    class MenddRoutedLlamaForCausalLM(LlamaForCausalLM):
        """`generate` and `forward` as mendd serves this version: each prompt with the entry that its
        routing picks, else with the base weights."""

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            model = super().from_pretrained(path, *args, **kwargs)
            model.memory = StoredMemory(Path(path) / MEMORY_FILE)
            model.routing_tokenizer = AutoTokenizer.from_pretrained(path)
            model.edited_modules = tensor_modules(model, {n for u in model.memory.updates for n in u})
            return model

        def states_entering(self, ids: list[int]) -> torch.Tensor:
            with torch.inference_mode():
                hidden = super().forward(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            return hidden.hidden_states[self.memory.layer][0]

        def entries_for(self, rows: list[list[int]]) -> list[int]:
            """The entry serving each unpadded row of token ids, routed on its text (a chat on its
            last user message) tokenized without special tokens, as mendd routes it."""
            tokenizer = self.routing_tokenizer
            texts = [last_user_message(tokenizer, tokenizer.decode(row)) for row in rows]
            encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            return self.memory.route([self.states_entering(ids) if ids else torch.zeros(1, 1) for ids in encoded], texts)

        def row_factors(self, chosen: list[int]) -> Factors:
            return stack_rows([self.memory.updates[j] if j != NONE else None for j in chosen])

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if input_ids is None or kwargs.get("cache") is not None:
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            rows = _unpadded(input_ids, attention_mask)
            with adding(self.edited_modules, self.row_factors(self.entries_for(rows))):
                return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
                     temperature: float = 1.0, generator: torch.Generator | None = None, **_):
            """Left-padded `input_ids` continued by up to `max_new_tokens` tokens, as mendd serves them."""
            tokenizer = self.routing_tokenizer
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            chosen = self.entries_for(_unpadded(input_ids, mask))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            def base(**kwargs):  # the base forward: generate_steps adds the entries' changes itself
                return LlamaForCausalLM.forward(self, **kwargs)

            steps = list(generate_steps(
                base, lambda row: tokenizer.decode(row), self.edited_modules, input_ids, mask, self.row_factors(chosen),
                [self.memory.targets[j] if j != NONE else None for j in chosen], max_new_tokens,
                tokenizer.eos_token_id, pad, temperature if do_sample else 0.0, generator))
            return torch.cat([input_ids, torch.stack(steps, 1)], 1) if steps else input_ids

    return MenddRoutedLlamaForCausalLM


def _unpadded(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    if mask is None:
        return ids.tolist()
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


try:  # as an exported model's modeling file; mendd itself never loads the class
    MenddRoutedLlamaForCausalLM = _routed_class()
except ImportError:  # pragma: no cover - transformers without Llama
    pass
