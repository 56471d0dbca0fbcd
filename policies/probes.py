"""Fixed probe sets read from the shared editing data: unrelated prompts and held-out text."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from editors.types import LocalityPrompt


class DataNotFound(FileNotFoundError):
    pass


def data_dir() -> Path:
    """$MENDD_DATA, else ../shared/data beside the checkout (where the shared data lives)."""
    env = os.environ.get("MENDD_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for candidate in candidates:
        if (candidate / "counterfact").is_dir():
            return candidate
    raise DataNotFound(f"editing data not found (looked in {', '.join(map(str, candidates))}); set MENDD_DATA")


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
    # ten words of context, the next four as the answer: short, since every token costs a suffix pass
    sentences = [line.split() for line in wikitext_lines(root)[half::2] if len(line.split()) >= 14]
    for words in rng.sample(sentences, min(n_sentences, len(sentences))):
        probes.append(LocalityPrompt(" ".join(words[:10]), " ".join(words[10:14])))
    return probes


def wikitext_lines(root: Path) -> list[str]:
    text = (root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("=")]


def wikitext_chunks(root: Path, tokenizer, n_chunks: int = 4, chunk_tokens: int = 128, offset_lines: int = 1000) -> list[list[int]]:
    """Contiguous held-out text for perplexity, from a fixed place in WikiText-2's test split."""
    ids: list[int] = []
    for line in wikitext_lines(root)[offset_lines:]:
        ids.extend(tokenizer(" " + line, add_special_tokens=False).input_ids)
        if len(ids) >= n_chunks * chunk_tokens:
            break
    return [ids[i * chunk_tokens : (i + 1) * chunk_tokens] for i in range(n_chunks)]


def preserved_text(root: Path, tokenizer) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Text whose keys an edit should not move: the training half of zsRE's questions and
    WikiText-2 beyond the perplexity sample; never the sets a gate or an evaluation measures on."""
    questions = [(p.prompt, p.answer) for p in unrelated_prompts(root, 10_000, 0, half=1)]
    return questions, wikitext_chunks(root, tokenizer, n_chunks=16, chunk_tokens=128, offset_lines=1500)
