"""channels.yaml -> validated Settings, with errors that name file, line and field path.

The schema is assembled from the registry: each source, transform and destination
contributes its own pydantic model, and ``type:`` picks one (a discriminated union).
So a new component needs no change here, and `medrelay components` documents exactly
what validation accepts.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from engine import registry
from engine.audit.syslog import SyslogConfig
from engine.components import secret_field
from engine.console.config import ConsoleConfig
from engine.mapping.conditions import When
from engine.mapping.tables import TableSpec
from engine.ops.alerts import AlertsConfig
from engine.ops.retention import ChannelRetention, RetentionConfig
from engine.store.handlers import STORE_HANDLERS

# $$, ${VAR}, ${VAR:-default}, ${file:PATH}, ${generated:PATH}
_VAR = re.compile(r"\$\$|\$\{(?:(file|generated):([^}]+)|([^}:]+)(?::-([^}]*))?)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3BlobConfig(_Strict):
    """`store.s3:` the S3-compatible service holding the blobs (same encryption and names as the folder)."""

    endpoint: str | None = Field(None, description="service URL (MinIO, Ceph, R2...); unset = AWS S3 by region")
    region: str | None = Field(None, description="region (AWS_REGION when unset)")
    access_key_id: str | None = secret_field(default=None, description="access key id (${ENV}); unset = "
                                             "the AWS_* environment or instance role")
    secret_access_key: str | None = secret_field(default=None, description="secret access key (${ENV})")
    allow_http: bool = Field(False, description="allow a plain-HTTP endpoint (tests, a local gateway only)")


class StoreConfig(_Strict):
    url: str = Field("sqlite:///data/medrelay.db", description="SQLAlchemy URL: sqlite:///path or "
                     "postgresql+psycopg://user@host/db; relative sqlite paths are relative to the YAML file")
    blobs: str = Field("data/blobs", description="folder for large encrypted payloads, or s3://bucket/prefix "
                       "for an S3-compatible object store shared by several hosts (see `s3`)")
    inline_max_bytes: int = Field(256 * 1024, ge=0, description="payloads up to this size live in the database")
    s3: S3BlobConfig | None = Field(None, description="object storage settings when `blobs` is s3://...")


class KeysConfig(_Strict):
    kek_file: str = Field("data/keys.json", description="key-encryption key file, created 0600 when absent")


class MetricsConfig(_Strict):
    host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    port: int | None = Field(None, ge=0, le=65535, description="port of /metrics, /healthz and /readyz; unset = off")
    stall_after: float = Field(300.0, gt=0, description="/readyz fails when a route's next delivery has been due "
                               "this many seconds without a worker taking it")


class AuditConfig(_Strict):
    """`audit:` where the audit trail is exported (it is always kept in the store)."""

    syslog: SyslogConfig | None = Field(None, description="send every audit event as a DICOM PS3.15 A.5 "
                                        "message over syslog/TLS (RFC 5424 + RFC 5425) to an audit repository")
    source_id: str | None = Field(None, description="AuditSourceID in the messages (default: host name)")
    site_id: str | None = Field(None, description="AuditEnterpriseSiteID in the messages")


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug may show PHI; "
                                                                 "info and above never do")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console renderer on a TTY, JSON lines otherwise")


class RetryConfig(_Strict):
    max_attempts: int = Field(10, ge=1, description="attempts before the delivery is dead-lettered")
    initial_delay: float = Field(1.0, gt=0, description="seconds before the first retry")
    max_delay: float = Field(300.0, gt=0, description="upper bound of the backoff")
    multiplier: float = Field(2.0, ge=1.0, description="each retry waits this much longer (with ±20 % jitter)")


class DebounceConfig(_Strict):
    """Wait until a key (e.g. StudyInstanceUID) has been quiet, then deliver its last message once."""

    key: str = Field(..., description="header whose value groups messages, e.g. StudyInstanceUID")
    seconds: float = Field(..., gt=0, description="quiet period: a newer message with the same key "
                           "supersedes the pending one and restarts the wait")


WhenValue = str | int | float | list[str | int | float]


@dataclass
class Settings:
    """The validated configuration plus where it came from."""

    path: Path
    base_dir: Path
    config_hash: str
    model: Any  # the dynamic root model instance
    tables: dict[str, Any] = field(default_factory=dict)  # top-level `tables:`, loaded (engine/mapping/tables.py)
    raw: Any = None
    line_of: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # ${generated:PATH} files: path -> True when this load created it (False: it exists, or
    # will be created by `medrelay run`: see ``pending_secrets``)
    generated_secrets: dict[Path, bool] = field(default_factory=dict)

    @property
    def pending_secrets(self) -> list[Path]:
        """``${generated:PATH}`` files that do not exist yet (`medrelay run` creates them)."""
        return [p for p in self.generated_secrets if not p.exists()]

    @property
    def store(self) -> StoreConfig:
        return self.model.store

    @property
    def keys(self) -> KeysConfig:
        return self.model.keys

    @property
    def metrics(self) -> MetricsConfig:
        return self.model.metrics

    @property
    def log(self) -> LogConfig:
        return self.model.log

    @property
    def audit(self) -> AuditConfig:
        return self.model.audit

    @property
    def alerts(self) -> AlertsConfig | None:
        return self.model.alerts

    @property
    def retention(self) -> RetentionConfig:
        return self.model.retention

    @property
    def console(self) -> ConsoleConfig | None:
        return self.model.console

    @property
    def channels(self) -> dict[str, Any]:
        return self.model.channels

    def resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.base_dir / path

    def blob_files(self) -> Any:
        """The blob location: a folder (relative to the YAML file) or an S3 bucket."""
        from engine.store.blobfiles import S3Settings, open_blob_files

        loc = self.store.blobs
        if loc.startswith("s3://"):
            s3 = self.store.s3 or S3BlobConfig()
            return open_blob_files(loc, S3Settings(s3.endpoint, s3.region, s3.access_key_id,
                                                   s3.secret_access_key, s3.allow_http))
        return open_blob_files(self.resolve(loc))

    def store_url(self) -> str:
        url = self.store.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///"):]
            if rel and rel != ":memory:":
                return "sqlite:///" + str(self.resolve(rel))
        return url


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str
    phase: Literal["yaml", "schema", "topology", "environment"]

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems

    @property
    def exit_code(self) -> int:
        phases = {p.phase for p in self.problems}
        for code, phase in ((2, "yaml"), (2, "schema"), (3, "topology"), (4, "environment")):
            if phase in phases:
                return code
        return 1


# -- dynamic schema ---------------------------------------------------
def _union(role: registry.Role) -> Any:
    models = [c.config for c in registry.components(role)]
    if not models:
        return create_model(f"No{role.title()}", __config__=ConfigDict(extra="forbid"),
                            type=(Literal["<none registered>"], ...))
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


def build_root_model() -> type[BaseModel]:
    source, transform, destination = (_union(r) for r in registry.ROLES)
    cfg = ConfigDict(extra="forbid", frozen=True)
    route = create_model(
        "Route", __config__=cfg,
        name=(str, Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="unique in its channel")),
        when=(When, Field(default_factory=dict)),
        transforms=(list[transform], Field(default_factory=list, description="applied in order")),  # type: ignore[valid-type]
        to=(destination, ...),
        retry=(RetryConfig, Field(default_factory=RetryConfig, description="backoff of failed deliveries")),
        ordered=(bool, Field(True, description="a message waits while the one before it is retried")),
        debounce=(DebounceConfig | None, Field(None, description="deliver a key's last message once it has been "
                                               "quiet (makes the route unordered)")),
    )
    channel = create_model(
        "Channel", __config__=cfg,
        source=(source, ...),
        routes=(list[route], Field(default_factory=list, description="every matching route gets a delivery")),  # type: ignore[valid-type]
        dedupe_window=(float, Field(86400.0, ge=0, description="seconds in which a repeated message (MSH-3/4/10, "
                                    "FHIR conditional create) is answered with the original outcome")),
        enabled=(bool, Field(True, description="false: the channel is not started")),
        retention=(ChannelRetention | None, Field(None, description="prune this channel's messages after `days`")),
    )
    return create_model(
        "Settings", __config__=cfg,
        store=(StoreConfig, Field(default_factory=StoreConfig, description="database and blob folder")),
        keys=(KeysConfig, Field(default_factory=KeysConfig, description="the key file")),
        metrics=(MetricsConfig, Field(default_factory=MetricsConfig, description="/metrics, /healthz, /readyz")),
        log=(LogConfig, Field(default_factory=LogConfig, description="log level and format")),
        audit=(AuditConfig, Field(default_factory=AuditConfig, description="audit trail export")),
        alerts=(AlertsConfig | None, Field(None, description="thresholds on queues and listeners, sent to a webhook")),
        retention=(RetentionConfig, Field(default_factory=RetentionConfig, description="how the pruner runs")),
        console=(ConsoleConfig | None, Field(None, description="operator console (UI at /) and admin API "
                 "(JSON under /api); unset = off")),
        tables=(dict[str, TableSpec], Field(default_factory=dict, description="code tables for lookups "
                "(engine/mapping/tables.py)")),
        channels=(dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], channel],  # type: ignore[valid-type]
                  Field(..., description="name -> a source and its routes")),
    )


# -- YAML with positions ----------------------------------------------
def _lines(node: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, CommentedMap):
        for k in node:
            try:
                out[(*path, k)] = node.lc.key(k)[0] + 1
            except (KeyError, TypeError):
                pass
            _lines(node[k], (*path, k), out)
    elif isinstance(node, CommentedSeq):
        for i, v in enumerate(node):
            try:
                out[(*path, i)] = node.lc.item(i)[0] + 1
            except (KeyError, TypeError):
                pass
            _lines(v, (*path, i), out)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


# What a missing ${generated:} file reads as when nothing may create it (`check`, offline
# commands): it validates, and it is random, so a Runtime built from such settings has a
# token nobody knows rather than a default credential.
GENERATED_PENDING = f"<generated-on-first-run:{secrets.token_urlsafe(24)}>"


def generate_secret(path: Path) -> bool:
    """Create ``path`` (mode 0600) holding a random token unless it exists; True if this call made it.

    The token is written to a temporary file and hard-linked into place, so a second
    process starting at the same moment either wins or reads the complete winner,
    never an empty or half-written file.
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _interpolate(data: Any, path: tuple[Any, ...], env: dict[str, str], base: Path,
                 refs: dict[tuple[Any, ...], str], errors: list[tuple[tuple[Any, ...], str]] | None,
                 generated: dict[Path, bool] | None = None, create: bool = False) -> Any:
    """Replace ${VAR}, ${VAR:-default}, ${file:PATH} and ${generated:PATH}; remember which values
    were references.

    ``${generated:PATH}`` reads a token file like ``${file:}``; with ``create`` (only
    `medrelay run`) a missing one is made first, so a new installation needs no secret
    typed anywhere; otherwise a missing one is a placeholder that validates.
    """
    generated = {} if generated is None else generated
    if isinstance(data, dict):
        return {k: _interpolate(v, (*path, k), env, base, refs, errors, generated, create)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, (*path, i), env, base, refs, errors, generated, create)
                for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        scheme, target = m.group(1), m.group(2)
        if scheme:
            fp = Path(target.strip())
            fp = fp if fp.is_absolute() else base / fp
            if scheme == "generated":
                made = create and generate_secret(fp)
                generated[fp] = generated.get(fp, False) or made
                if not fp.exists():
                    return GENERATED_PENDING
            try:
                return fp.read_text().strip()
            except OSError as e:
                if errors is None:
                    return f"<unreadable:{fp}>"
                errors.append((path, f"cannot read secret file {fp}: {e.strerror}"))
                return ""
        name, default = m.group(3), m.group(4)
        if name in env:
            return env[name]
        if default is not None:
            return default
        if errors is None:  # offline tools (messages, replay, keys) do not need the secrets
            return f"<unset:{name}>"
        errors.append((path, f"environment variable {name} is not set"))
        return ""

    refs[path] = data
    return _VAR.sub(sub, data)


TLS_FILES = ("cert", "key", "ca")


def tls_blocks(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every `tls:` mapping in the raw config (sources, routes, peers, audit.syslog) with its path."""
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "tls" and isinstance(v, dict):
                yield (*path, k), v
            else:
                yield from tls_blocks(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from tls_blocks(v, (*path, i))


def _resolve_tls_paths(data: Any, base: Path) -> None:
    """Relative cert/key/ca paths are relative to the YAML file, like the store paths.

    Without this they would be opened relative to the working directory of whoever
    started the engine, while `medrelay check` looked beside the YAML.
    """
    for _, block in tls_blocks(data):
        for attr in TLS_FILES:
            v = block.get(attr)
            if isinstance(v, str) and v and not Path(v).is_absolute():
                block[attr] = str(base / v)


def _strings(node: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, (*path, i))
    elif isinstance(node, str):
        yield path, node


def _loc_to_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the union tags pydantic inserts into error locations, keeping real keys."""
    path: list[Any] = []
    node = data
    for el in loc:
        if isinstance(node, dict) and el in node:
            path.append(el)
            node = node[el]
        elif isinstance(node, list) and isinstance(el, int) and el < len(node):
            path.append(el)
            node = node[el]
        elif isinstance(node, dict) and isinstance(el, str) and node.get("type") == el:
            continue  # discriminator tag
        elif isinstance(el, str) and "[" in el:
            continue  # function-after / union member names
        else:
            path.append(el)
            node = None
    return tuple(path)


def _line_for(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _walk_secrets(model: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if not isinstance(model, BaseModel):
        return
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        value = getattr(model, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("secret"):
            if isinstance(value, list | tuple):
                for i, _ in enumerate(value):
                    yield (*path, key, i), value
            elif value is not None:
                yield (*path, key), value
        if isinstance(value, BaseModel):
            yield from _walk_secrets(value, (*path, key))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                yield from _walk_secrets(v, (*path, key, i))
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from _walk_secrets(v, (*path, key, k))


def parse_settings(text: str, path: Path, env: dict[str, str] | None = None, *,
                   need_env: bool = True, create_secrets: bool = False) -> Settings:
    """Parse and validate; raises ConfigError listing every problem found.

    ``need_env=False`` is for commands that only read the store (messages, replay,
    keys): an unset ${VAR} becomes a placeholder instead of an error.
    ``create_secrets`` (the engine itself) creates missing ``${generated:PATH}`` files.
    """
    env = dict(os.environ) if env is None else env
    fname = str(path)
    yaml = YAML(typ="rt")
    try:
        with warnings.catch_warnings():  # a reused anchor's warning quotes the file's lines (values)
            warnings.simplefilter("ignore")
            doc = yaml.load(text)
    except MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError([Problem(fname, line, "", f"YAML: {_yaml_problem(e, text)}", "yaml")]) from None
    if not isinstance(doc, dict):
        raise ConfigError([Problem(fname, 1, "", "expected a mapping with `channels:`", "schema")])
    lines: dict[tuple[Any, ...], int] = {}
    _lines(doc, (), lines)
    plain = _plain(doc)
    refs: dict[tuple[Any, ...], str] = {}
    env_errors: list[tuple[tuple[Any, ...], str]] = []
    generated: dict[Path, bool] = {}
    data = _interpolate(plain, (), env, path.parent, refs, env_errors if need_env else None, generated,
                        create_secrets)
    _resolve_tls_paths(data, path.parent.resolve())
    problems = [Problem(fname, _line_for(p, lines), dotted(p), msg, "environment") for p, msg in env_errors]
    if not need_env:  # offline commands still need the store and key file themselves
        for section in ("store", "keys"):
            for p, v in _strings(data.get(section), (section,)):
                if "<unset:" in v or "<unreadable:" in v:
                    problems.append(Problem(fname, _line_for(p, lines), dotted(p),
                                            f"needs {v[v.index('<') + 1:v.index('>')].split(':', 1)[1]} "
                                            "from the environment", "environment"))
    root = build_root_model()
    model = None
    try:
        model = root.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            p = _loc_to_path(tuple(err["loc"]), data)
            if any(_related(p, ep) for ep, _ in env_errors):
                continue  # the value is empty because its ${VAR} is unset: that is the problem to report
            problems.append(Problem(fname, _line_for(p, lines), dotted(p), err["msg"], "schema"))
    if model is not None:
        for spath, _ in _walk_secrets(model, ()):
            if spath not in refs:
                problems.append(Problem(fname, _line_for(spath, lines), dotted(spath),
                                        "secrets must be references (${ENV_VAR}, ${file:path} or ${generated:path}), "
                                        "not literals in the YAML", "schema"))
        problems.extend(_topology(model, fname, lines))
    tables = _load_tables(model, path, fname, lines, problems) if model is not None else {}
    if problems:
        raise ConfigError(_scrubbed(problems, data))
    settings = Settings(path=path, base_dir=path.parent.resolve(),
                    config_hash=hashlib.sha256(text.encode()).hexdigest(), model=model, raw=data,
                    line_of=lines, generated_secrets={p.resolve(): made for p, made in generated.items()})
    settings.tables = tables
    settings.config_hash = _with_tables(settings.config_hash, tables)
    return settings


_DUP_KEY = re.compile(r'found duplicate key "(.*?)" with value')


def _yaml_problem(e: MarkedYAMLError, text: str) -> str:
    """The parser's problem without the values it quotes.

    ruamel's duplicate-key message carries both values in full (a whole `store:` with its
    URL, a channel with its token), so it is rewritten to the key and where it was first
    given. No config message prints a value (docs/architecture.md, configuration).
    """
    problem = str(e.problem or "syntax error")
    m = _DUP_KEY.match(problem)
    if not m:
        return problem
    key = m.group(1)
    key = key if len(key) <= 64 else key[:61] + "..."
    first = _first_key_line(text, m.group(1), e)
    return f'found duplicate key "{key}"' + (f" (first at line {first})" if first else "")


def _first_key_line(text: str, key: str, e: MarkedYAMLError) -> int | None:
    """The line of the first ``key:`` in the duplicate's block mapping (same indentation)."""
    if e.problem_mark is None:
        return None
    lines = text.splitlines()
    dup, col = e.problem_mark.line, e.problem_mark.column
    start = e.context_mark.line if e.context_mark is not None else 0
    keys = (f"{key}:", f'"{key}":', f"'{key}':")
    for n in range(start, min(dup, len(lines))):
        ln = lines[n]
        if len(ln) - len(ln.lstrip(" -")) == col and ln[col:].startswith(keys):
            return n + 1
    return None


_SECRET_KEY = re.compile(r"^(.*url|.*password.*|.*passwd.*|.*token.*|.*secret.*|.*access_key.*|.*private_key|"
                         r"headers|authorization|dsn|credentials?)$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)[^\s@/'\"]+@", re.IGNORECASE)


def _scrubbed(problems: list[Problem], data: Any) -> list[Problem]:
    """Problems whose messages quote no secret: a value under a key named like a secret (url,
    password, token, headers...; from the YAML or from ${ENV}/${file:}) is replaced by ``***``,
    and so is the password of any URL. pydantic messages (``err["msg"]``, never ``str(error)`` with
    its ``input_value``) rarely quote the input, but validators' own messages may."""
    values = {value for path, value in _strings(data, ())
              if len(value) >= 4 and any(isinstance(p, str) and _SECRET_KEY.match(p) for p in path)}
    out = []
    for p in problems:
        msg = p.message
        for v in sorted(values, key=len, reverse=True):
            msg = msg.replace(v, "***")
        msg = _URL_PASSWORD.sub(r"\1***@", msg)
        out.append(p if msg == p.message else Problem(p.file, p.line, p.path, msg, p.phase))
    return out


def _related(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """One path lies inside the other (a validator of `auth` failing on its unset `bearer_tokens[0]`)."""
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]


def _topology(model: Any, fname: str, lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    out: list[Problem] = []
    for cname, ch in model.channels.items():
        seen: set[str] = set()
        for i, route in enumerate(ch.routes):
            rp = ("channels", cname, "routes", i, "name")
            if route.name in seen:
                out.append(Problem(fname, _line_for(rp, lines), dotted(rp),
                                   f"route name {route.name!r} used twice in this channel", "topology"))
            seen.add(route.name)
            kind = source_kind(ch.source)
            store_as: str | None = None  # a transform's store_as header picks the store's handler
            out.extend(_routing_key_problems(kind, route, ("channels", cname, "routes", i), fname, lines))
            for j, t in enumerate(route.transforms):
                comp = registry.get("transform", t.type)
                tp = ("channels", cname, "routes", i, "transforms", j, "type")
                if kind and comp.kinds and kind not in comp.kinds:
                    out.append(Problem(fname, _line_for(tp, lines), dotted(tp),
                                       f"transform {t.type!r} takes {'/'.join(comp.kinds)} messages but "
                                       f"this step gets {kind}", "topology"))
                kind = getattr(t, "output_kind", None) or _output_kind(t.type, kind)
                store_as = _STORE_AS.get(t.type, store_as)
            out.extend(_store_kind_problems(route.to, kind, store_as, ("channels", cname, "routes", i, "to"),
                                            fname, lines))
    out.extend(_reference_problems(model, fname, lines))
    out.extend(_port_problems(model, fname, lines))
    return out


def _reference_problems(model: Any, fname: str, lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    """Every name one part of the config gives another must exist (engine.components.Reference).

    A component config says which of its fields are names (``references()``); `alerts.routes`
    keys (`channel/route`) are checked here too. A wrong name is a topology error, since
    at run time it would silently match nothing (an app ACK that waits for no route).
    """
    out: list[Problem] = []
    channels = model.channels
    for cname, ch in channels.items():
        route_names = {r.name for r in ch.routes}
        parts: list[tuple[tuple[Any, ...], Any, str | None]] = [(("channels", cname, "source"), ch.source, None)]
        for i, route in enumerate(ch.routes):
            rp = ("channels", cname, "routes", i)
            parts += [((*rp, "transforms", j), t, route.name) for j, t in enumerate(route.transforms)]
            parts.append(((*rp, "to"), route.to, route.name))
        for where, cfg, own in parts:
            refs = getattr(cfg, "references", None)
            for ref in refs() if callable(refs) else ():
                msg = None
                if ref.kind == "route" and ref.name == own:
                    msg = f"route {ref.name!r} names itself"
                elif ref.kind == "route" and ref.name not in route_names:
                    msg = f"no route {ref.name!r} in channel {cname}{_did_you_mean(ref.name, route_names)}"
                elif ref.kind == "dicom_channel" and (ref.name not in channels
                                                      or getattr(channels[ref.name].source, "type", "") != "dicom"):
                    dicom = {n for n, c in channels.items() if getattr(c.source, "type", "") == "dicom"}
                    msg = f"no DICOM channel {ref.name!r}{_did_you_mean(ref.name, dicom)}"
                if msg:
                    p = (*where, *ref.loc)
                    out.append(Problem(fname, _line_for(p, lines), dotted(p), msg, "topology"))
    alerts = model.alerts
    for key in alerts.routes if alerts is not None else ():
        cname, _, rname = key.partition("/")
        p = ("alerts", "routes", key)
        if cname not in channels:
            msg = f"no channel {cname!r}{_did_you_mean(cname, set(channels))} (keys are `channel/route`)"
        elif rname not in {r.name for r in channels[cname].routes}:
            msg = (f"no route {rname!r} in channel {cname}"
                   f"{_did_you_mean(rname, {r.name for r in channels[cname].routes})}")
        else:
            continue
        out.append(Problem(fname, _line_for(p, lines), dotted(p), msg, "topology"))
    return out


def _did_you_mean(name: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_ANY_HOST = {"", "0.0.0.0", "::", "[::]", "*"}
_LOOPBACK = {"localhost": "127.0.0.1", "[::1]": "::1"}


def _port_problems(model: Any, fname: str, lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    """Two listeners of this engine on one port: channels' sources, `metrics`, `console`.

    `run` would fail on the second bind with "already in use", naming whichever started
    last, and the operator would look for another process. 0.0.0.0 / :: bind every
    address, so they clash with any host on that port; port 0 (any free port) never clashes.
    """
    listeners: list[tuple[tuple[Any, ...], str, str, int]] = []  # (path of port, who, host, port)
    for cname, ch in model.channels.items():
        port = getattr(ch.source, "port", None)
        if isinstance(port, int) and port:
            listeners.append((("channels", cname, "source", "port"), f"channel {cname!r}",
                              str(getattr(ch.source, "host", "127.0.0.1")), port))
    if model.metrics.port:
        listeners.append((("metrics", "port"), "metrics", model.metrics.host, model.metrics.port))
    if model.console is not None and model.console.port:
        listeners.append((("console", "port"), "console", model.console.host, model.console.port))
    out: list[Problem] = []
    for n, (path, _, host, port) in enumerate(listeners):
        h = _LOOPBACK.get(host.lower(), host.lower())
        for _, other, ohost, oport in listeners[:n]:
            oh = _LOOPBACK.get(ohost.lower(), ohost.lower())
            if oport == port and (h == oh or h in _ANY_HOST or oh in _ANY_HOST):
                out.append(Problem(fname, _line_for(path, lines), dotted(path),
                                   f"port {port} on {host} is also used by {other} (on {ohost})", "topology"))
                break
    return out


def _routing_key_problems(kind: str | None, route: Any, rp: tuple[Any, ...], fname: str,
                          lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    """`when:` keys and `debounce.key` the source's messages cannot have (a typo routes nothing)."""
    from engine import routing_keys

    out: list[Problem] = []
    keys = [(("when", *sub), key, value, scope) for sub, key, value, scope in routing_keys.condition_keys(route.when)]
    if route.debounce is not None:
        keys.append((("debounce", "key"), route.debounce.key, None, {}))
    for sub, key, value, scope in keys:
        msg = routing_keys.problem(kind, key, scope)
        if msg is None and sub[0] == "when":
            msg = routing_keys.value_problem(kind, key, value)
        if msg is not None:
            p = (*rp, *sub)
            out.append(Problem(fname, _line_for(p, lines), dotted(p), msg, "topology"))
    return out


_SOURCE_KIND = {"mllp": "hl7v2", "dicom": "dicom", "fhir": "fhir"}
_OUTPUT_KIND = {"dicom_to_hl7": "hl7v2", "dicom_to_fhir": "fhir", "hl7_to_fhir": "fhir",
                "hl7_to_worklist": "dicom"}


# Transforms whose output carries a store_as header: the store files it with that handler.
_STORE_AS = {"hl7_to_worklist": "worklist", "patient_update": "patient_update", "iocm_rejection": "iocm"}


def _store_kind_problems(to: Any, kind: str | None, store_as: str | None, tp: tuple[Any, ...], fname: str,
                         lines: dict[tuple[Any, ...], int]) -> list[Problem]:
    """`to: {type: store}` given a kind no store handler files (a raw HL7 v2 message): at run time
    each one would be acknowledged and then dead-lettered, so it is a topology error here."""
    if getattr(to, "type", None) != "store" or getattr(to, "as_", None) or store_as or not kind:
        return []
    if kind in STORE_HANDLERS:
        return []
    files = ", ".join(k for k in ("dicom", "fhir") if k in STORE_HANDLERS) or "none"
    hint = " (e.g. hl7_to_fhir, hl7_to_worklist)" if kind == "hl7v2" else ""
    return [Problem(fname, _line_for(tp, lines), dotted(tp),
                    f"the store has no handler for {kind} messages (it files {files} messages): add a "
                    f"transform that produces one{hint} before it, or as:", "topology")]


def source_kind(source: Any) -> str | None:
    """The kind a source's messages have; sources of several kinds may say (``message_kind``)."""
    return _SOURCE_KIND.get(getattr(source, "type", "")) or getattr(source, "message_kind", None)


def _output_kind(transform_type: str, kind: str | None) -> str | None:
    return _OUTPUT_KIND.get(transform_type, kind)


def load_settings(path: str | os.PathLike[str], env: dict[str, str] | None = None, *,
                  need_env: bool = True, create_secrets: bool = False) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(p), None, "", f"cannot read: {e.strerror}", "environment")]) from None
    return parse_settings(text, p, env, need_env=need_env, create_secrets=create_secrets)


# -- code tables and mapping rules (engine/mapping) ---------------------------------
def _load_tables(model: Any, path: Path, fname: str, lines: dict[tuple[Any, ...], int],
                 problems: list[Problem]) -> dict[str, Any]:
    """Load top-level `tables:` (relative to the YAML) and check every transform's rules against them.

    A transform config with ``rule_problems(tables)`` (hl7_map, dicom_map, fhir_map, the
    converters' code tables) returns (location inside the transform, message) errors.
    """
    from engine.mapping.tables import load_tables

    tables, errors = load_tables(model.tables, path.parent.resolve())
    for e in errors:
        p = ("tables", getattr(e, "table", ""), e.attr)
        problems.append(Problem(fname, _line_for(p, lines), dotted(p), e.message, e.phase))  # type: ignore[arg-type]
    for cname, ch in model.channels.items():
        for i, route in enumerate(ch.routes):
            for j, t in enumerate(route.transforms):
                check = getattr(t, "rule_problems", None)
                for err in check(tables) if check is not None else ():
                    p = ("channels", cname, "routes", i, "transforms", j, *err.loc)
                    problems.append(Problem(fname, _line_for(p, lines), dotted(p), err.message, "schema"))
    return tables


def _with_tables(config_hash: str, tables: dict[str, Any]) -> str:
    """The config hash covers the tables' content too: an edited CSV is a changed config."""
    from engine.mapping.tables import digest

    d = digest(tables)
    return hashlib.sha256(f"{config_hash}:{d}".encode()).hexdigest() if d else config_hash
