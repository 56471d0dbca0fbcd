"""The gate's policy: per check, the threshold to accept and the looser one to hold for a person.

Read and validated once, when mendd starts; a policy with an unknown key, a threshold out of range,
or a hold threshold stricter than its accept threshold stops mendd with the key named.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_POLICY = Path(__file__).with_name("default.yaml")

# Checks where a higher value is better (a minimum); the others are maxima. The generation checks
# (repetition, leaks, other_leak) are optional: a policy without them does not generate answers at the gate.
MINIMUMS = ("reliability", "generalization", "locality", "retention")
MAXIMUMS = ("ppl_drawdown", "repetition", "leaks", "other_leak")
OPTIONAL = ("repetition", "leaks", "other_leak")


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and the key."""


class _Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accept: float = Field(ge=0.0, le=1.0)
    hold: float = Field(ge=0.0, le=1.0)


class _AtLeast(_Thresholds):
    @model_validator(mode="after")
    def _hold_is_looser(self) -> "_AtLeast":
        if self.hold > self.accept:
            raise ValueError(f"hold ({self.hold}) must not be above accept ({self.accept}) for a minimum")
        return self


class _AtMost(_Thresholds):
    accept: float = Field(ge=0.0, le=10.0)
    hold: float = Field(ge=0.0, le=10.0)

    @model_validator(mode="after")
    def _hold_is_looser(self) -> "_AtMost":
        if self.hold < self.accept:
            raise ValueError(f"hold ({self.hold}) must not be below accept ({self.accept}) for a maximum")
        return self


class _Checks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reliability: _AtLeast
    generalization: _AtLeast
    locality: _AtLeast
    retention: _AtLeast
    ppl_drawdown: _AtMost
    repetition: _AtMost | None = None
    leaks: _AtMost | None = None
    other_leak: _AtMost | None = None


class _PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checks: _Checks


@dataclass(frozen=True)
class Threshold:
    check: str
    accept: float
    hold: float
    higher_is_better: bool


@dataclass(frozen=True)
class Policy:
    source: str  # the file it came from, for the record
    thresholds: tuple[Threshold, ...]

    def threshold(self, check: str) -> Threshold:
        return next(t for t in self.thresholds if t.check == check)

    def checks(self, check: str) -> bool:
        """Whether the policy has `check` (the optional ones may be left out)."""
        return any(t.check == check for t in self.thresholds)

    def as_params(self) -> dict[str, float]:
        """Flat names for the record: policy.locality.accept = 0.95, ..."""
        out = {}
        for t in self.thresholds:
            out[f"policy.{t.check}.accept"] = t.accept
            out[f"policy.{t.check}.hold"] = t.hold
        return out


def load_policy(path: Path | None = None) -> Policy:
    path = path or DEFAULT_POLICY
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PolicyError(f"policy file {path} cannot be read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"policy file {path} is not valid YAML: {error}") from None
    try:
        parsed = _PolicyFile.model_validate(raw if raw is not None else {})
    except ValidationError as error:
        problems = "; ".join(f"key {'.'.join(map(str, e['loc'])) or '(top level)'}: {_words(e)}" for e in error.errors())
        raise PolicyError(f"policy file {path}: {problems}") from None
    checks = parsed.checks
    thresholds = tuple(
        Threshold(name, getattr(checks, name).accept, getattr(checks, name).hold, name in MINIMUMS)
        for name in (*MINIMUMS, *MAXIMUMS) if getattr(checks, name) is not None)
    return Policy(str(path), thresholds)


def _words(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "missing"
    return f"{error['msg']} (got {error.get('input')!r})"
