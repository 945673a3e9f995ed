"""Settings: built-in defaults (a small board's own, boards.py) < YAML file < ``EDGEKB_*``
environment < command-line overrides.

The schema is the dataclasses below; ``default_config.yaml`` next to this module documents every
key with the same defaults (a test keeps the two in step). Adding a section is one dataclass plus
one ``Settings`` field; value rules go in ``_CHECKS``. Validation collects every problem before
raising one ``ConfigError``, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from edgekb import boards
from edgekb.errors import ConfigError
from edgekb.logs import FORMATS as LOG_FORMATS
from edgekb.logs import LEVELS as LOG_LEVELS

DEFAULT_CONFIG_FILE = Path(__file__).with_name("default_config.yaml")
ENV_PREFIX = "EDGEKB_"
ENV_CONFIG = "EDGEKB_CONFIG"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    flush_interval_ms: int = 50
    max_message_bytes: int = 65536
    heartbeat_s: float = 20.0
    pong_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    send_timeout_s: float = 30.0
    compress: bool = False


@dataclass(frozen=True)
class ModelsSettings:
    manifest: str = ""
    cache_dir: str = ""
    llm: str = "auto"
    embedder: str = "minilm-l6-int8"
    llm_small_board: str = "smollm2-135m"
    llm_large_board: str = "qwen25-coder-05b"
    small_board_mb: int = 1536


@dataclass(frozen=True)
class RetrievalSettings:
    k: int = 4
    sibling_chunks: int = 2


@dataclass(frozen=True)
class ChunkingSettings:
    chunk_tokens: int = 200
    overlap_tokens: int = 40


@dataclass(frozen=True)
class QueueSettings:
    max_waiting: int = 16
    max_per_user: int = 3


@dataclass(frozen=True)
class SessionsSettings:
    grace_s: float = 120.0


@dataclass(frozen=True)
class StorageSettings:
    min_free_mb: int = 64


@dataclass(frozen=True)
class HttpSettings:
    heartbeat_s: float = 15.0


@dataclass(frozen=True)
class MetricsSettings:
    access: str = "loopback"


@dataclass(frozen=True)
class IngestSettings:
    max_file_mb: int = 64
    part_inflated_mb: int = 64
    document_inflated_mb: int = 256


@dataclass(frozen=True)
class EmbeddingSettings:
    threads: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    threads: int = 0
    n_batch: int = 128
    state_cache_mb: int = 64
    slots: int = 4


@dataclass(frozen=True)
class RetentionSettings:
    sessions_days: float = 90.0
    turns_days: float = 30.0
    request_logs_days: float = 2.0
    max_mb: float = 256.0
    sweep_interval_s: float = 300.0


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "WARNING"
    format: str = "human"
    file: str = ""
    file_max_mb: int = 10
    file_backups: int = 3


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = True
    algorithms: str = "HS256"
    issuer: str = "edgekb"
    audience: str = "edgekb"
    leeway_s: float = 30.0
    page_login_hours: float = 8.0
    max_token_ttl_h: float = 720.0
    public_key_file: str = ""
    allowed_origins: str = ""
    hostnames: str = ""
    trusted_proxies: str = ""


@dataclass(frozen=True)
class LimitsSettings:
    questions_per_minute: int = 30
    connections_per_address: int = 20
    connections_total: int = 2000
    upload_request_mb: int = 256
    login_failures: int = 5
    header_timeout_s: float = 30.0
    body_timeout_s: float = 20.0
    body_min_bytes_s: int = 500


@dataclass(frozen=True)
class TlsSettings:
    certificate: str = ""
    private_key: str = ""


@dataclass(frozen=True)
class AuditSettings:
    path: str = ""
    max_mb: int = 16
    keep: int = 4
    question_text: bool = False


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("~/.local/share/edgekb")
    server: ServerSettings = field(default_factory=ServerSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    chunking: ChunkingSettings = field(default_factory=ChunkingSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    sessions: SessionsSettings = field(default_factory=SessionsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    def __post_init__(self) -> None:
        # Normalised here so that Settings(data_dir=...) built directly (tests, tools) is safe too.
        object.__setattr__(self, "data_dir", _absolute(self.data_dir))

    @property
    def models_cache(self) -> Path:
        cache_dir = self.models.cache_dir
        return _absolute(cache_dir) if cache_dir else self.data_dir / "models"

    @property
    def manifest_path(self) -> Path | None:
        return _absolute(self.models.manifest) if self.models.manifest else None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "edgekb.db"

    @property
    def log_file(self) -> Path | None:
        return _absolute(self.logging.file) if self.logging.file else None

    @property
    def docs_dir(self) -> Path:
        """Where uploaded documents are kept, one folder per knowledge base."""
        return self.data_dir / "docs"

    @property
    def audit_path(self) -> Path:
        return _absolute(self.audit.path) if self.audit.path else self.data_dir / "audit.log"


_Check = tuple[Callable[[Any], bool], str]


def _between(low: float, high: float) -> _Check:
    return (lambda v: low <= v <= high), f"be between {low} and {high}"


def _at_least(low: float) -> _Check:
    return (lambda v: v >= low), f"be at least {low}"


_NON_EMPTY: _Check = (lambda v: bool(v.strip()), "not be empty")
# Algorithms a token may be signed with; "none" is never one of them.
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")


def split_list(value: str) -> list[str]:
    """A comma-separated setting (origins, host names, proxies) as its items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _networks(value: str) -> bool:
    try:
        for item in split_list(value):
            ipaddress.ip_network(item, strict=False)
    except ValueError:
        return False
    return True


def _origins(value: str) -> bool:
    return all(re.fullmatch(r"https?://[^/\s?#]+", item) for item in split_list(value))


_ALGORITHM_LIST: _Check = (
    lambda v: bool(split_list(v)) and all(a in JWT_ALGORITHMS for a in split_list(v)),
    f"be a comma-separated list of {', '.join(JWT_ALGORITHMS)}")

# Value rules by key; keys absent here accept any value of the right type.
_CHECKS: dict[str, _Check] = {
    "data_dir": _NON_EMPTY,
    "server.host": _NON_EMPTY,
    "server.port": ((lambda v: 0 <= v <= 65535), "be between 1 and 65535 (or 0 for any free port)"),
    "server.flush_interval_ms": _between(0, 1000),
    "server.max_message_bytes": _between(256, 16 * 1024 * 1024),
    "server.heartbeat_s": ((lambda v: v > 0), "be greater than 0"),
    "server.pong_timeout_s": ((lambda v: v > 0), "be greater than 0"),
    "server.idle_timeout_s": _at_least(0),
    "server.send_timeout_s": ((lambda v: v > 0), "be greater than 0"),
    "queue.max_waiting": _between(1, 1000),
    "queue.max_per_user": _between(1, 100),
    "sessions.grace_s": _at_least(0),
    "storage.min_free_mb": _between(0, 1 << 20),
    "http.heartbeat_s": ((lambda v: v > 0), "be greater than 0"),
    "metrics.access": ((lambda v: v in ("loopback", "token")), "be loopback or token"),
    "generation.state_cache_mb": _between(0, 4096),
    "models.llm": _NON_EMPTY,
    "models.embedder": _NON_EMPTY,
    "models.llm_small_board": _NON_EMPTY,
    "models.llm_large_board": _NON_EMPTY,
    "models.small_board_mb": _at_least(0),
    "retrieval.k": _between(1, 50),
    "retrieval.sibling_chunks": _between(0, 16),
    "chunking.chunk_tokens": _between(32, 512),
    "chunking.overlap_tokens": _at_least(0),
    "ingest.max_file_mb": _between(1, 1024),
    "ingest.part_inflated_mb": _between(1, 4096),
    "ingest.document_inflated_mb": _between(1, 16384),
    "auth.algorithms": _ALGORITHM_LIST,
    "auth.trusted_proxies": (_networks, "be comma-separated IP addresses or CIDR networks"),
    "auth.allowed_origins": (_origins, "be comma-separated origins like https://hmi.plant:8443"),
    "auth.issuer": _NON_EMPTY,
    "auth.audience": _NON_EMPTY,
    "auth.leeway_s": _between(0, 300),
    "auth.page_login_hours": ((lambda v: 0 < v <= 24 * 90), "be between 0 and 2160"),
    "auth.max_token_ttl_h": ((lambda v: 0 < v <= 24 * 3660), "be between 0 and 87840 hours"),
    "limits.questions_per_minute": _between(1, 100_000),
    "limits.connections_per_address": _between(1, 1_000_000),
    "limits.connections_total": _between(1, 1_000_000),
    "limits.upload_request_mb": _between(1, 16384),
    "limits.login_failures": _between(1, 1000),
    "limits.header_timeout_s": ((lambda v: 0 < v <= 3600), "be between 0 and 3600"),
    "limits.body_timeout_s": ((lambda v: 0 < v <= 3600), "be between 0 and 3600"),
    "limits.body_min_bytes_s": _at_least(0),
    "audit.max_mb": _between(1, 4096),
    "audit.keep": _between(1, 100),
    "embedding.threads": _at_least(0),
    "embedding.batch_size": _between(1, 256),
    "generation.max_tokens": _between(1, 4096),
    "generation.temperature": _between(0, 2),
    "generation.threads": _at_least(0),
    "generation.n_batch": _at_least(1),
    "generation.slots": _between(1, 16),
    "retention.sessions_days": _at_least(0),
    "retention.turns_days": _at_least(0),
    "retention.request_logs_days": _at_least(0),
    "retention.max_mb": _at_least(0),
    "retention.sweep_interval_s": _between(1, 86400),
    "logging.level": ((lambda v: v.upper() in LOG_LEVELS), f"be one of {', '.join(LOG_LEVELS)}"),
    "logging.format": ((lambda v: v in LOG_FORMATS), f"be one of {', '.join(LOG_FORMATS)}"),
    "logging.file_max_mb": _between(1, 1024),
    "logging.file_backups": _between(0, 100),
}
# Rules between two keys of the merged result: key must be less than the other key.
_LESS_THAN: dict[str, str] = {"chunking.overlap_tokens": "chunking.chunk_tokens"}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path",
               bool: "true or false"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().absolute()


def _typed_fields(cls: type) -> list[tuple[Field[Any], type]]:
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]


def _schema() -> dict[str, tuple[type, Any]]:
    """Every setting as dotted key -> (type, default), derived from the dataclasses."""
    schema: dict[str, tuple[type, Any]] = {}
    for f, typ in _typed_fields(Settings):
        if is_dataclass(typ):
            for g, leaf in _typed_fields(typ):
                schema[f"{f.name}.{g.name}"] = (leaf, g.default)
        else:
            schema[f.name] = (typ, _coerce(f.default, typ))
    return schema


def _sections(schema: Mapping[str, Any]) -> set[str]:
    return {key.split(".")[0] for key in schema if "." in key}


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _coerce(value: Any, typ: type) -> Any:
    """``value`` as ``typ``, parsing text (env, ``--set``, quoted YAML); ValueError if it is not."""
    if typ in (str, Path):
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if typ is bool and text in _TRUE | _FALSE:
            return text in _TRUE
        try:
            number = int(text) if typ is int else float(text) if typ is float else None
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
    elif isinstance(value, bool):  # bool is an int to Python, never to a user
        if typ is bool:
            return value
    elif typ is int and isinstance(value, int):
        return value
    elif typ is float and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise ValueError(f"expected {_TYPE_NAMES[typ]}, got {_show(value)}")


def _suggest(name: str, known: list[str]) -> str:
    leaf = name.rsplit(".", 1)[-1]
    # A right key in the wrong section first, then a typo among keys at the same depth.
    matches = [key for key in known if key.rsplit(".", 1)[-1] == leaf]
    if not matches:
        peers = [key for key in known if key.count(".") == name.count(".")]
        matches = difflib.get_close_matches(name, peers, n=1)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


class _Layer:
    """Validates one source of values into ``values``, keeping that source's ``problems``."""

    def __init__(self, schema: dict[str, tuple[type, Any]], values: dict[str, Any]) -> None:
        self.schema, self.values = schema, values
        self.problems: list[str] = []
        self.known = sorted(schema) + sorted(_sections(schema))

    def set(self, key: str, value: Any, label: str) -> None:
        """Validate and take ``value`` for ``key``; ``label`` names where it came from."""
        if key not in self.schema:
            hint = _suggest(key, self.known)
            named = f"unknown key '{key}'" if label == key else f"{label}: unknown key"
            self.problems.append(named + hint)
            return
        try:
            value = _coerce(value, self.schema[key][0])
        except ValueError as exc:
            self.problems.append(f"{label}: {exc}")
            return
        check, must = _CHECKS.get(key, (lambda v: True, ""))
        if not check(value):
            self.problems.append(f"{label}: must {must}, got {_show(value)}")
            return
        self.values[key] = value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {path}: {exc}"], str(path)) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        reason = getattr(exc, "problem", None) or str(exc)
        if context:  # where the broken construct began, often the line to fix
            reason += f" ({exc.context} on line {context.line + 1})"  # type: ignore[attr-defined]
        raise ConfigError([f"{where}: not valid YAML: {reason}"], str(path)) from None
    if tree is None:  # an empty file, or one with every line commented out
        return {}
    if not isinstance(tree, dict):
        raise ConfigError([(f"{path}: the top level must be a mapping of keys, "
                            f"got {type(tree).__name__}")], str(path))
    return tree


def _apply_file(tree: dict[str, Any], layer: _Layer) -> None:
    sections = _sections(layer.schema)
    for name, value in tree.items():
        name = str(name)
        if name not in sections:
            layer.set(name, value, name)
        elif isinstance(value, dict):
            for key, leaf in value.items():
                layer.set(f"{name}.{key}", leaf, f"{name}.{key}")
        elif value is not None:  # `server:` with every key commented out means "all defaults"
            layer.problems.append(f"{name}: expected a mapping of keys, got {_show(value)}")


def _apply_env(env: Mapping[str, str], layer: _Layer) -> None:
    by_name = {ENV_PREFIX + key.upper().replace(".", "__"): key for key in layer.schema}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        if name in by_name:
            layer.set(by_name[name], env[name], name)
            continue
        # Compared without the prefix they all share, which would make any two names alike.
        bare = {key[len(ENV_PREFIX):]: key for key in by_name}
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], sorted(bare), n=1)
        hint = f" (did you mean {bare[close[0]]!r}?)" if close else ""
        if hint or "__" in name:  # others (EDGEKB_FOO) may belong to tools, not to settings
            layer.problems.append(f"{name}: unknown setting variable{hint}")


def _apply_overrides(overrides: Mapping[str, Any], layer: _Layer) -> None:
    for key, value in overrides.items():
        if value is not None:  # an unset CLI flag, so the CLI may pass every flag as it is
            layer.set(key, value, f"{key} (command line)")


def load_settings(config_file: Path | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None,
                  meminfo: Path = boards.MEMINFO) -> Settings:
    """Merge every source of settings; raise ConfigError listing every problem found.

    On a board with less memory than ``models.small_board_mb`` the built-in defaults are the
    small-board profile's (boards.small_board_defaults); every source above still wins."""
    env = os.environ if env is None else env
    if config_file is None and env.get(ENV_CONFIG):
        config_file = Path(env[ENV_CONFIG])
    sources: list[tuple[str, Callable[[_Layer], None]]] = []
    if config_file is not None:
        path = _absolute(config_file)
        tree = _read_file(path)
        sources.append((str(path), lambda layer: _apply_file(tree, layer)))
    sources.append(("the environment", lambda layer: _apply_env(env, layer)))
    sources.append(("the command line", lambda layer: _apply_overrides(overrides or {}, layer)))
    settings = _merge(sources)
    board = boards.small_board_defaults(settings.models.small_board_mb, meminfo)
    if board is None:
        return settings
    label, defaults = board
    return _merge([(label, lambda layer: _apply_file(defaults, layer)), *sources])


def _merge(sources: list[tuple[str, Callable[[_Layer], None]]]) -> Settings:
    """The built-in defaults, then each source in turn."""
    schema = _schema()
    values = {key: default for key, (_, default) in schema.items()}
    layers: list[tuple[str, _Layer]] = []
    for source, apply in sources:
        layers.append((source, _Layer(schema, values)))
        apply(layers[-1][1])
    problems = [problem for _, each in layers for problem in each.problems]
    for key, other in _LESS_THAN.items():
        if values[key] >= values[other]:
            problems.append(f"{key}: must be less than {other} ({values[other]}), "
                            f"got {values[key]}")
    if problems:
        raise ConfigError(problems, ", ".join(source for source, each in layers if each.problems))
    return _build(values)


def _build(values: dict[str, Any]) -> Settings:
    kwargs: dict[str, Any] = {}
    for f, typ in _typed_fields(Settings):
        if is_dataclass(typ):
            kwargs[f.name] = typ(**{g.name: values[f"{f.name}.{g.name}"] for g in fields(typ)})
        else:
            kwargs[f.name] = typ(values[f.name])
    return Settings(**kwargs)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def schema_defaults() -> dict[str, Any]:
    """The built-in defaults as a nested mapping, the shape of a config file."""
    return _nest({key: default for key, (_, default) in _schema().items()})


def settings_to_yaml(settings: Settings) -> str:
    """The effective settings as YAML: a complete config file that load_settings accepts."""
    flat: dict[str, Any] = {}
    for key, (typ, _) in _schema().items():
        value: Any = settings
        for part in key.split("."):
            value = getattr(value, part)
        flat[key] = _coerce(value, typ)
    return yaml.safe_dump(_nest(flat), sort_keys=False, default_flow_style=False)


def parse_set_option(text: str) -> tuple[str, str]:
    """``"server.port=9000"`` -> ``("server.port", "9000")``; the value is parsed later."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. server.port=9000"],
                          "the command line")
    return key, value.strip()
