"""Read correction records in the formats of the field into Corrections.

mendd JSONL is native: CorrectionRecord defines it, and daemon/correction.schema.json is generated
from it (see README). CounterFact comes flat (EasyEdit) or as ROME's
`requested_rewrite`; zsRE as MEND split it; MQuAKE cases carry several rewrites each. Every problem
raises FormatError naming the record and the field, so a feed can quarantine that record and go on.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, ValidationError

from editors.types import Correction, LocalityPrompt

FORMATS = ("mendd", "counterfact", "rome", "zsre", "mquake")


class FormatError(ValueError):
    def __init__(self, record: str, field: str, problem: str, raw: str | None = None):
        super().__init__(f"record {record}, field {field!r}: {problem}")
        self.record, self.field, self.problem = record, field, problem
        self.raw = raw  # the record as received, where the stream reader knows it: kept with its quarantine


# The id rule. An id is written into version commit messages, logs and every listing, so it is
# short and plain: nothing in one can start a line, hide a character or pass for a separator. The
# ids the formats generate (cf-<case_id>, zsre-<hash>, mquake-<case_id>-<i>, content ids) keep it.
ID_RULE = "1 to 128 characters, each an ASCII letter, digit or one of . _ : @ / + = # -"
_ID = re.compile(r"[A-Za-z0-9._:@/+=#-]{1,128}")


def is_valid_id(value: object) -> bool:
    """Whether `value` is a correction id under the id rule (see ID_RULE)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


# A native record's id: one under the rule, or empty (as absent). `(?![\s\S])` ends the string in
# both Python's and JSON Schema's regex dialects, where `$` differs (Python's also matches before a final newline).
NativeId = Annotated[str, StringConstraints(strict=True, pattern=rf"^(?:{_ID.pattern})?(?![\s\S])")]

# A string with something besides whitespace (`\S` as Python's re reads it, so exactly `str.strip()`).
NonBlank = Annotated[str, StringConstraints(strict=True, pattern=r"\S")]


class _Record(BaseModel):
    # Python's re, not pydantic's default Rust engine: their `\S` differ on control characters
    # that str.strip() removes; unknown fields are ignored, as a producer may add its own.
    model_config = ConfigDict(regex_engine="python-re", frozen=True)


class LocalityRecord(_Record):
    """A nearby prompt whose answer the correction must leave alone."""

    prompt: NonBlank = Field(description="The prompt, e.g. 'The capital of Italy is'.")
    answer: NonBlank = Field(description="The answer the model gives it now, e.g. 'Rome'.")


class CorrectionRecord(_Record):
    """A fact the model should state differently. Only prompt and target_new are required; the rest make the gate's checks sharper."""

    model_config = ConfigDict(title="mendd correction (one line of a mendd JSONL feed)", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mendd.invalid/schemas/correction.schema.json"})

    prompt: NonBlank = Field(description="The text the model continues, e.g. 'The capital of France is'.")
    target_new: NonBlank = Field(description="The continuation the model should give, e.g. 'Lyon'. A leading space "
                                 "is added when the prompt does not end in one.")
    id: NativeId | None = Field(None, description=(
        f"The producer's id: {ID_RULE}. A repeat of (feed, id), or of the same content, is stored once. Default "
        "(absent, null or empty): a hash of prompt and target_new."))
    subject: NonBlank | None = Field(None, description=(
        "The entity the fact is about, as written in the prompt, e.g. 'France'. It decides which questions the "
        "correction answers: the routed memory keys the correction on the model's hidden state at the subject's "
        "last token in the prompt (and, for a subject of two tokens or more, on the state one token before it), "
        "and a query is served by this correction when its text names the subject (its words in order, any case; "
        "or one of the aliases) and one of its tokens' states comes close to that key (with the state before it "
        "close to the second). When it is absent or not in the prompt, mendd takes the prompt's "
        "last run of capitalised words that are not pronouns or sentence openers ('The currency of Japan is the' -> 'Japan'), "
        "and the prompt's last token when there is none; give it for lower-case names. The other editors do not "
        "read it."))
    aliases: NonBlank | Annotated[list[NonBlank], Strict()] = Field([], description=(
        "Other names of the subject (one string or a list), e.g. 'Kilimanjaro' for 'Mount Kilimanjaro': the routed "
        "memory serves a query only when its text names the subject (its words in order, any case) or one of these."))
    target_old: NonBlank | None = Field(None, description="What the model says now; used for CounterFact-style scoring.")
    rephrases: NonBlank | Annotated[list[NonBlank], Strict()] = Field([], description=(
        "Other wordings of the prompt (one string or a list); the gate checks generalization on them, and "
        "retention keeps them."))
    locality_prompts: Annotated[list[LocalityRecord], Strict()] = Field([], description=(
        "Nearby prompts whose answers must not change."))

    def correction(self, source: str) -> Correction:
        return Correction(
            id=self.id or content_id(self.prompt, self.target_new), prompt=self.prompt, target_new=self.target_new,
            subject=self.subject, target_old=self.target_old,
            rephrases=_texts(self.rephrases), aliases=_texts(self.aliases),
            locality_prompts=tuple(LocalityPrompt(lp.prompt, lp.answer) for lp in self.locality_prompts),
            source=source)


def _texts(value: str | list[str]) -> tuple[str, ...]:
    """A field that takes one string or a list of them, as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


def correction_schema() -> str:
    """The JSON Schema of a native record, as committed in daemon/correction.schema.json."""
    return json.dumps(CorrectionRecord.model_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _first_problem(error: ValidationError) -> tuple[str, str]:
    """The field and problem of a record's first invalid field, in the words the other formats use."""
    detail = error.errors()[0]
    loc, value = detail["loc"], detail["input"]
    if loc[0] in ("rephrases", "aliases"):  # a union: its errors name pydantic's branches, not the record's field
        return loc[0], "must be a string or a list of non-empty strings"
    if loc[0] == "locality_prompts" and len(loc) == 1:
        return "locality_prompts", "must be a list of {prompt, answer} objects"
    if loc[0] == "locality_prompts" and len(loc) == 2:
        return f"locality_prompts[{loc[1]}]", "must be an object with prompt and answer"
    field = f"locality_prompts[{loc[1]}].{loc[2]}" if loc[0] == "locality_prompts" else str(loc[0])
    if detail["type"] == "missing" or detail["type"] == "string_type" and value is None:
        return field, "is missing"
    if field == "id" and detail["type"] == "string_pattern_mismatch":
        return field, f"must be {ID_RULE}"
    problems = {"string_pattern_mismatch": "is empty or whitespace",
                "string_type": f"must be a string, got {type(value).__name__}"}
    return field, problems.get(detail["type"], detail["msg"])


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
    corrections = parse(fields, source)
    if not all(is_valid_id(correction.id) for correction in corrections):  # a derived id, e.g. cf-<case_id>
        raise FormatError(fields.label, "id", f"must be {ID_RULE}")
    return corrections


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
            corrections = parse_record(record, fmt, source, position)
        except FormatError as error:
            error.raw = _as_text(record)
            corrections = [error]
        except Exception as exc:  # a limit of Python's or a parser bug costs this record, never the feed
            corrections = [FormatError(f"#{position}", "(record)", f"could not be read: {_why(exc)}", _as_text(record))]
        for item in corrections:
            yield position, item


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
        except Exception as exc:  # as in _lines
            yield 1, FormatError("(file)", "(json)", f"not a valid JSON array: {_why(exc)}")
            return
        yield from enumerate(records, start=1)
        return
    yield from _lines(handle, 1)


def _lines(lines: Iterable[bytes], first: int) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=first):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except Exception as exc:  # valid JSON may still be unreadable: over 4,300 digits is a plain ValueError
            record = FormatError(f"line {number}", "(json)", _why(exc), line.decode("utf-8", "replace"))
        yield number, record


def _as_text(record: Any) -> str:
    """A decoded record as JSON text again (what a quarantine keeps of it)."""
    try:
        return json.dumps(record)  # ASCII: a lone surrogate escape stays text that can be hashed and stored
    except (ValueError, RecursionError):
        return repr(record)[:100_000]


def _why(exc: Exception) -> str:
    """An exception as a quarantine reason (bounded: its message may quote the record)."""
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class _Fields:
    """Typed access to a record's fields with errors that name the record and the field."""

    def __init__(self, record: dict, label: str):
        self.record = record
        ident = record.get("id", record.get("case_id"))
        name = str(ident) if isinstance(ident, int) and not isinstance(ident, bool) else ident
        # an id that breaks the id rule must not name the record in errors, logs and listings either
        self.label = name if is_valid_id(name) else label

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
    for name in ("rephrases", "aliases"):
        if getattr(correction, name):
            record[name] = list(getattr(correction, name))
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
    try:
        record = CorrectionRecord.model_validate(f.record)
    except ValidationError as error:
        field, problem = _first_problem(error)
        raise FormatError(f.label, field, problem) from None
    return [record.correction(source)]


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
