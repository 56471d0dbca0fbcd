"""Fixed probe sets read from the editing data: unrelated prompts and held-out text."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from editors.types import LocalityPrompt


# A WikiText sentence probe: ten words of context, the next four as the answer; short, since every
# token costs a suffix pass.
CONTEXT_WORDS, ANSWER_WORDS = 10, 4
# Where in WikiText-2's lines the perplexity sample starts, and the preserved text after it.
PERPLEXITY_FROM_LINE, PRESERVED_FROM_LINE = 1000, 1500


class DataNotFound(FileNotFoundError):
    pass


# The editing data the repository carries (package data: `mendd init` pins the suites from it).
BUNDLED_DATA = Path(__file__).resolve().parent / "data"


def data_dir() -> Path:
    """$MENDD_DATA (a folder laid out as policies/data), else the data shipped with mendd."""
    env = os.environ.get("MENDD_DATA")
    candidate = Path(env) if env else BUNDLED_DATA
    if (candidate / "wikitext2").is_dir():
        return candidate
    where = f"MENDD_DATA={env}" if env else f"{candidate} (shipped with mendd; is the installation complete?)"
    raise DataNotFound(f"editing data not found in {where}")


def unrelated_prompts(root: Path, n_questions: int = 150, n_sentences: int = 100, seed: int = 0,
                      half: int = 0) -> list[LocalityPrompt]:
    """zsRE's Natural Questions probes with their answers, and WikiText-2 sentences split in two.

    Each source is halved by position: half 0 is the measuring set, half 1 is for training an
    editor's locality, so an editor never trains on the prompts it is measured on.
    """
    zsre = json.loads((root / "zsre" / "zsre_mend-1k.json").read_text())
    questions = [LocalityPrompt(r["loc"], r["loc_ans"]) for r in zsre[half::2] if r.get("loc") and r.get("loc_ans")]
    rng = random.Random(seed)
    probes = rng.sample(questions, min(n_questions, len(questions)))
    sentences = sentence_probes(wikitext_lines(root)[half::2])
    return probes + rng.sample(sentences, min(n_sentences, len(sentences)))


def sentence_probes(lines: list[str]) -> list[LocalityPrompt]:
    """A probe from every line long enough: its first words as the prompt, the next as the answer."""
    return [LocalityPrompt(" ".join(words[:CONTEXT_WORDS]), " ".join(words[CONTEXT_WORDS:CONTEXT_WORDS + ANSWER_WORDS]))
            for line in lines if len(words := line.split()) >= CONTEXT_WORDS + ANSWER_WORDS]


def wikitext_lines(root: Path) -> list[str]:
    text = (root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("=")]


def wikitext_chunks(root: Path, tokenizer, n_chunks: int = 4, chunk_tokens: int = 128) -> list[list[int]]:
    """Contiguous held-out text for perplexity, from a fixed place in WikiText-2's test split."""
    return token_chunks(wikitext_lines(root)[PERPLEXITY_FROM_LINE:], tokenizer, n_chunks, chunk_tokens)


def token_chunks(lines: list[str], tokenizer, n_chunks: int, chunk_tokens: int) -> list[list[int]]:
    ids: list[int] = []
    for line in lines:
        ids.extend(tokenizer(" " + line, add_special_tokens=False).input_ids)
        if len(ids) >= n_chunks * chunk_tokens:
            break
    return [ids[i * chunk_tokens : (i + 1) * chunk_tokens] for i in range(n_chunks)]


def preserved_lines(root: Path) -> list[str]:
    """WikiText-2 lines for the preserved keys: the training half (odd lines), past the perplexity
    sample, less any line that repeats the opening of a measuring-half line (WikiText has repeats)."""
    lines = wikitext_lines(root)
    openings = {probe.prompt for probe in sentence_probes(lines[0::2])}
    return [line for line in lines[PRESERVED_FROM_LINE + 1 :: 2] if not any(opening in line for opening in openings)]


def preserved_text(root: Path, tokenizer) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Text whose keys an edit should not move: the training half of zsRE's questions and of
    WikiText-2; never the sets a gate or an evaluation measures on."""
    questions = [(p.prompt, p.answer) for p in unrelated_prompts(root, 10_000, 0, half=1)]
    return questions, token_chunks(preserved_lines(root), tokenizer, n_chunks=16, chunk_tokens=128)
