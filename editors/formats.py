"""Read correction records in the formats of the field into Corrections.

mendd JSONL is native (see README); CounterFact comes flat (EasyEdit) or as ROME's
`requested_rewrite`; zsRE as MEND split it; MQuAKE cases carry several rewrites each. Every problem
raises FormatError naming the record and the field, so a feed can quarantine that record and go on.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from editors.types import Correction, LocalityPrompt

FORMATS = ("mendd", "counterfact", "rome", "zsre", "mquake")


class FormatError(ValueError):
    def __init__(self, record: str, field: str, problem: str):
        super().__init__(f"record {record}, field {field!r}: {problem}")
        self.record, self.field, self.problem = record, field, problem


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise FormatError("?", "(record)", f"must be a JSON object, got {type(record).__name__}")
    if isinstance(record.get("requested_rewrite"), list):
        return "mquake"
    if isinstance(record.get("requested_rewrite"), dict):
        return "rome"
    if "src" in record and "alt" in record:
        return "zsre"
    if "rephrase_prompt" in record or "ground_truth" in record or "case_id" in record:
        return "counterfact"
    return "mendd"


def parse_record(record: Any, fmt: str = "auto", source: str = "manual", position: int | None = None) -> list[Correction]:
    """One record -> its corrections (MQuAKE cases give several)."""
    label = f"#{position}" if position is not None else "?"
    if fmt == "auto":
        fmt = detect_format(record)
    if not isinstance(record, dict):
        raise FormatError(label, "(record)", f"must be a JSON object, got {type(record).__name__}")
    if not _is_unicode(record):
        raise FormatError(label, "(record)", "holds a string with an unpaired surrogate (a JSON escape such as "
                          "\\ud800 alone): that is not Unicode text, and no ledger can store it")
    if fmt not in FORMATS:
        raise FormatError(label, "(format)", f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    fields = _Fields(record, label)
    parse = {"mendd": _mendd, "counterfact": _counterfact, "rome": _rome, "zsre": _zsre, "mquake": _mquake}[fmt]
    return parse(fields, source)


def read_file(path: Path, fmt: str = "auto", source: str | None = None) -> Iterator[Correction | FormatError]:
    """Every correction in a JSON array or JSONL file, or the FormatError of a bad record, in order."""
    with open(path, "rb") as handle:
        for _, item in read_stream(handle, fmt, source or str(path)):
            yield item


def read_stream(handle: BinaryIO | Iterable[bytes], fmt: str = "auto", source: str = "manual",
                after: int = 0, first_line: int | None = None) -> Iterator[tuple[int, Correction | FormatError]]:
    """(position, correction or error) for each record after position `after`, read as a stream.

    A position is a line number in JSONL and an index in a JSON array; a feed keeps the last one
    it stored as its cursor. MQuAKE records give several corrections at one position. With
    `first_line`, `handle` is JSONL lines from within a file, the first of them line `first_line`.
    """
    for position, record in _records(handle) if first_line is None else _lines(handle, first_line):
        if position <= after:
            continue
        if isinstance(record, FormatError):
            yield position, record
            continue
        try:
            for correction in parse_record(record, fmt, source, position):
                yield position, correction
        except FormatError as error:
            yield position, error


def load_corrections(path: Path, fmt: str = "auto", limit: int | None = None) -> tuple[list[Correction], list[FormatError]]:
    """For training and evaluation: the good corrections of a file (at most `limit`) and the errors."""
    good: list[Correction] = []
    bad: list[FormatError] = []
    for item in read_file(path, fmt):
        (bad if isinstance(item, FormatError) else good).append(item)
        if limit is not None and len(good) >= limit:
            break
    return good, bad


def is_json_array(handle: BinaryIO) -> bool:
    """Whether a stream is one JSON array (else JSONL); it is left at its start."""
    head = handle.read(1 << 16)
    handle.seek(0)
    return head.lstrip().startswith(b"[")


def _records(handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    """JSONL line by line (memory does not grow with the file), or a whole JSON array (1-based)."""
    if is_json_array(handle):
        try:
            records = json.loads(handle.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            yield 1, FormatError("(file)", "(json)", f"not a valid JSON array: {type(exc).__name__}: {exc}")
            return
        yield from enumerate(records, start=1)
        return
    yield from _lines(handle, 1)


def _lines(lines: Iterable[bytes], first: int) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=first):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            yield number, FormatError(f"line {number}", "(json)", f"{type(exc).__name__}: {exc}")


class _Fields:
    """Typed access to a record's fields with errors that name the record and the field."""

    def __init__(self, record: dict, label: str):
        self.record = record
        ident = record.get("id", record.get("case_id"))
        usable = isinstance(ident, int) and not isinstance(ident, bool) or isinstance(ident, str) and ident.strip()
        self.label = str(ident)[:100] if usable else label

    def text(self, key: str, data: dict | None = None, required: bool = True) -> str | None:
        data = self.record if data is None else data
        value = data.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            problem = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
            raise FormatError(self.label, key, problem)
        if not value.strip():
            raise FormatError(self.label, key, "is empty or whitespace")
        return value

    def texts(self, key: str, data: dict | None = None) -> tuple[str, ...]:
        data = self.record if data is None else data
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise FormatError(self.label, key, "must be a string or a list of non-empty strings")
        return tuple(value)

    def obj(self, key: str, data: dict | None = None) -> dict:
        data = self.record if data is None else data
        value = data.get(key)
        if not isinstance(value, dict):
            raise FormatError(self.label, key, "must be an object")
        return value


def to_record(correction: Correction) -> dict[str, Any]:
    """A correction in native mendd form, without its id or arrival time: what the ledger keeps
    (so the same fact sent twice hashes the same) and what `parse_record(..., "mendd")` reads back."""
    record: dict[str, Any] = {"prompt": correction.prompt, "target_new": correction.target_new}
    for name in ("subject", "target_old"):
        if getattr(correction, name) is not None:
            record[name] = getattr(correction, name)
    if correction.rephrases:
        record["rephrases"] = list(correction.rephrases)
    if correction.locality_prompts:
        record["locality_prompts"] = [{"prompt": lp.prompt, "answer": lp.answer} for lp in correction.locality_prompts]
    return record


def from_record(correction_id: str, record: dict[str, Any], source: str) -> Correction:
    """The inverse of :func:`to_record`, with the id put back."""
    return parse_record({**record, "id": correction_id}, "mendd", source)[0]


def _is_unicode(value: Any) -> bool:
    """Whether every string in `value` can be written as UTF-8 (JSON lets an escape name half a character)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return False
    return True


def content_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _mendd(f: _Fields, source: str) -> list[Correction]:
    prompt, target = f.text("prompt"), f.text("target_new")
    locality = []
    raw = f.record.get("locality_prompts", [])
    if not isinstance(raw, list):
        raise FormatError(f.label, "locality_prompts", "must be a list of {prompt, answer} objects")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise FormatError(f.label, f"locality_prompts[{i}]", "must be an object with prompt and answer")
        locality.append(LocalityPrompt(f.text("prompt", item), f.text("answer", item)))
    rid = f.record.get("id")
    if rid is not None and not isinstance(rid, str):
        raise FormatError(f.label, "id", f"must be a string, got {type(rid).__name__}")
    return [Correction(
        id=rid or content_id(prompt, target), prompt=prompt, target_new=target,
        subject=f.text("subject", required=False), target_old=f.text("target_old", required=False),
        rephrases=f.texts("rephrases"), locality_prompts=tuple(locality), source=source,
    )]


def _counterfact(f: _Fields, source: str) -> list[Correction]:
    prompt, target = f.text("prompt"), f.text("target_new")
    locality = ()
    if f.record.get("locality_prompt") is not None:
        locality = (LocalityPrompt(f.text("locality_prompt"), f.text("locality_ground_truth")),)
    return [Correction(
        id=f"cf-{f.record['case_id']}" if "case_id" in f.record else content_id(prompt, target),
        prompt=prompt, target_new=target, subject=f.text("subject", required=False),
        target_old=f.text("ground_truth", required=False), rephrases=f.texts("rephrase_prompt"),
        locality_prompts=locality, source=source,
    )]


def _rewrite(f: _Fields, rewrite: dict, source: str, rid: str) -> Correction:
    subject = f.text("subject", rewrite)
    template = f.text("prompt", rewrite)
    if "{}" not in template:
        raise FormatError(f.label, "requested_rewrite.prompt", "must contain {} where the subject goes")
    return Correction(
        id=rid, prompt=template.replace("{}", subject), target_new=f.text("str", f.obj("target_new", rewrite)),
        subject=subject, target_old=f.text("str", f.obj("target_true", rewrite)), source=source,
    )


def _rome(f: _Fields, source: str) -> list[Correction]:
    rewrite = f.obj("requested_rewrite")
    base = _rewrite(f, rewrite, source, f"cf-{f.record.get('case_id', f.label)}")
    old = base.target_old or ""
    neighbours = tuple(LocalityPrompt(p, old) for p in f.texts("neighborhood_prompts"))
    return [Correction(**{**base.__dict__, "rephrases": f.texts("paraphrase_prompts"), "locality_prompts": neighbours})]


def _zsre(f: _Fields, source: str) -> list[Correction]:
    prompt, target = f.text("src"), f.text("alt")
    answers = f.record.get("answers")
    answers = answers if isinstance(answers, list) else []
    locality = ()
    if f.record.get("loc") is not None:
        locality = (LocalityPrompt(f.text("loc"), f.text("loc_ans")),)
    return [Correction(
        id=f"zsre-{content_id(prompt, target)}", prompt=prompt, target_new=target,
        subject=f.text("subject", required=False),
        target_old=answers[0] if answers and isinstance(answers[0], str) else None,
        rephrases=f.texts("rephrase"), locality_prompts=locality, source=source,
    )]


def _mquake(f: _Fields, source: str) -> list[Correction]:
    rewrites = f.record.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise FormatError(f.label, "requested_rewrite", "must be a non-empty list of rewrites")
    return [
        _rewrite(f, rewrite if isinstance(rewrite, dict) else {}, source, f"mquake-{f.record.get('case_id', f.label)}-{i}")
        for i, rewrite in enumerate(rewrites)
    ]
