"""What a person reads in a generated answer, as numbers: pure functions on text.

Teacher-forced scores (editors/scoring.py) only see the first answer token; these look at the
greedy continuation a user actually gets:

- `mentions`: the answer contains the target (case and spacing aside);
- `ngram_entropy`: ROME's generation fluency (Meng et al., 2022): the entropy of a text's word
  2-grams and 3-grams, weighted 2/3 and 4/3; runaway repetition ("euro euro euro") drives it down;
- `repeats`: some word 2-gram occurs three or more times, the shape of a runaway answer;
- `first_words`: the opening words, to tell whether an unrelated answer kept its meaning;
- `newly_says`: an answer says a target its answer before an edit did not (a leaked correction);
- `starts_running_away`: the first sign of a runaway answer, where serving drops an entry;
- `goes_back`: after saying the new target, the answer returns to the old fact (issue #35).
"""
from __future__ import annotations

import math
from collections import Counter

# The words, and the signs of a said target or a runaway answer, are shared with exported models.
from editors.memory_model import bare_words, mentions, starts_running_away, words

__all__ = ["bare_words", "first_words", "goes_back", "mentions", "newly_says", "ngram_entropy", "repeats",
           "starts_running_away", "words"]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(text: str, orders: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    tokens = words(text)
    return sum(w * entropy(Counter(ngrams(tokens, n))) for n, w in zip(orders, weights)) / sum(weights)


def repeats(text: str, n: int = 2, times: int = 3) -> bool:
    counts = Counter(ngrams(words(text), n))
    return bool(counts) and max(counts.values()) >= times


def first_words(text: str, k: int = 4) -> tuple[str, ...]:
    return tuple(bare_words(text)[:k])


def newly_says(after: str, before: str, target: str) -> bool:
    return mentions(after, target) and not mentions(before, target)


def after(text: str, target: str) -> list[str]:
    """The bare words after the first mention of `target` in `text`; none when it is not mentioned."""
    said, aimed = bare_words(text), bare_words(target)
    for i in range(len(said) - len(aimed) + 1):
        if aimed and said[i : i + len(aimed)] == aimed:
            return said[i + len(aimed):]
    return []


# How soon after the target the old fact's context counts as the answer's own: "London, France".
CONTEXT_WORDS = 2


def goes_back(served: str, base: str, target: str, old: str | None) -> bool:
    """After saying the new target, the answer goes back to the old fact: it names the old answer,
    or, right after the target, the word the base model put right after the old answer (the place
    or entity it belongs to: base "Paris, France", served "London, France")."""
    if not old or not mentions(served, target):
        return False
    rest = after(served, target)
    if mentions(" ".join(rest), old):
        return True
    context = after(base, old)[:1]
    return bool(context) and context[0] not in bare_words(target) and context[0] in rest[:CONTEXT_WORDS]
