"""kmodgate.toml: kernel sources, tracked modules, streams with their policies,
the store and the notification targets.

Every problem is reported as one UserError naming the key and the line of the
file it is on, e.g. ``kmodgate.toml:14: streams[1].min_soak: expected a
duration like "3d" or "12h", got "soon"``.  tomllib gives no positions for
keys, so the line is found by scanning the text (see KeyLocator).

Example::

    [store]
    url = "sqlite:///kmodgate.db"        # relative paths: next to this file

    [[sources]]
    name = "debian"
    type = "debian"                      # every linux-headers-*-amd64 apt offers
    flavour = "amd64"

    [[sources]]
    name = "playground"
    type = "directory"                   # side-band kernels are just another source
    path = "kernels/playground"
    side_band = true

    [modules.openrazer-driver]
    source = "debian-source:openrazer"
    maintainers = ["razer@example.org"]
    required = true
    tags = ["input"]

    [[streams]]
    name = "next"
    kinds = ["abi", "build"]
    modules = "required"                 # or ["a", "b"], or "tag:input"

    [[streams]]
    name = "testing"
    kinds = ["abi", "build"]
    min_soak = "3d"                      # time spent in the previous stream
    forbid_older = true

    [notify.email]
    host = "localhost"
    from = "kmodgate@example.org"

    [[notify.webhooks]]
    url = "https://ci.example.org/hooks/kmodgate"
    secret_env = "KMODGATE_WEBHOOK_SECRET"
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kmodgate.errors import UserError
from kmodgate.results import KINDS

DEFAULT_CONFIG_NAME = "kmodgate.toml"
DEFAULT_DB_NAME = "kmodgate.db"

SOURCE_TYPES = ("debian", "rpm", "directory")
EVENT_KINDS = ("regression", "fix", "decision")

# Keys each source type accepts besides the common ones; anything else is a typo.
_COMMON_SOURCE_KEYS = frozenset({"name", "type", "side_band", "line"})
_SOURCE_KEYS: dict[str, frozenset[str]] = {
    "debian": frozenset({"flavour", "pattern"}),
    "rpm": frozenset({"baseurl", "package", "pattern"}),
    "directory": frozenset({"path", "pattern"}),
}
_MODULE_KEYS = frozenset({"source", "maintainers", "required", "tags"})
_STREAM_KEYS = frozenset({"name", "kinds", "modules", "min_soak", "forbid_older"})
_EMAIL_KEYS = frozenset(
    {"host", "port", "starttls", "username", "password", "password_env", "from", "to",
     "maintainers", "events"}
)
_WEBHOOK_KEYS = frozenset({"url", "secret", "secret_env", "events", "timeout"})
_TOP_KEYS = frozenset({"store", "sources", "modules", "streams", "notify", "web"})

_DURATION_RE = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_EMAIL_RE = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class SourceConfig:
    """Where kernel builds come from; side-band kernels are one more source."""

    name: str
    type: str  # one of SOURCE_TYPES
    side_band: bool = False
    line: str | None = None  # overrides the line derived from the release
    flavour: str | None = None  # debian: only releases ending in -<flavour>
    pattern: str = "*"  # glob over kernel releases
    baseurl: str | None = None  # rpm: repository URL
    package: str = "kernel-devel"  # rpm: the package carrying Module.symvers
    path: Path | None = None  # directory: one kernel build per subdirectory


@dataclass(frozen=True)
class ModuleConfig:
    name: str
    source: str  # a module reference the build/abi engines understand
    maintainers: tuple[str, ...] = ()
    required: bool = True  # False: advisory, reported but never blocks a gate by default
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyConfig:
    """What a kernel needs before it may enter a stream."""

    kinds: tuple[str, ...] = ("abi",)
    # "required" (every module with required = true), "tag:<tag>", or explicit names.
    modules: str | tuple[str, ...] = "required"
    min_soak: timedelta = timedelta(0)  # time in the previous stream
    forbid_older: bool = False  # refuse a kernel older than the stream's current one


@dataclass(frozen=True)
class StreamConfig:
    name: str
    policy: PolicyConfig


@dataclass(frozen=True)
class EmailConfig:
    host: str
    sender: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    recipients: tuple[str, ...] = ()  # told about every event
    maintainers: bool = True  # also tell a module's maintainers about its events
    events: tuple[str, ...] = EVENT_KINDS


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    secret: str | None = None
    events: tuple[str, ...] = EVENT_KINDS
    timeout: float = 10.0


@dataclass(frozen=True)
class NotifyConfig:
    email: EmailConfig | None = None
    webhooks: tuple[WebhookConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    path: Path | None
    store_url: str
    sources: tuple[SourceConfig, ...] = ()
    modules: Mapping[str, ModuleConfig] = field(default_factory=dict)
    streams: tuple[StreamConfig, ...] = ()
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.streams) or "none configured"
        raise UserError(f"unknown stream {name!r} (streams: {known})")

    def previous_stream(self, name: str) -> StreamConfig | None:
        names = [s.name for s in self.streams]
        i = names.index(self.stream(name).name)
        return self.streams[i - 1] if i > 0 else None

    def policy_modules(self, stream: str) -> list[str]:
        """The modules that must pass for a kernel to enter *stream*."""
        selector = self.stream(stream).policy.modules
        if isinstance(selector, tuple):
            return list(selector)
        if selector.startswith("tag:"):
            tag = selector[4:]
            return sorted(m.name for m in self.modules.values() if tag in m.tags)
        return sorted(m.name for m in self.modules.values() if m.required)


def read_config_text(path: str | Path) -> str:
    """The configuration file's text; UserError naming the file if it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("no such configuration file", where=p) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read configuration: {exc}", where=p) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a kmodgate.toml; UserError naming the key and line if wrong."""
    return parse_config(read_config_text(path), Path(path))


def parse_config(text: str, path: str | Path | None = None) -> Config:
    p = Path(path) if path is not None else None
    label = str(p) if p is not None else DEFAULT_CONFIG_NAME
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line N, column M)": move the line to the front.
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)$", msg)
        where = f"{label}:{m.group(1)}" if m else label
        raise UserError(f"invalid TOML: {msg[:m.start()].strip() if m else msg}",
                        where=where) from None
    return _Parser(text, label, p).parse(data)


def parse_duration(value: object) -> timedelta | None:
    """'3d', '12h', '1d12h', '90m', '2w' or a number of seconds; None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return timedelta(seconds=value)
    if not isinstance(value, str):
        return None
    m = _DURATION_RE.match(value.strip())
    if not m or not any(m.groups()):
        return None
    w, d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return timedelta(weeks=w, days=d, hours=h, minutes=mi, seconds=s)


class KeyLocator:
    """The line each key of a TOML text is defined on.

    Good enough for configuration files people write: table headers,
    arrays of tables, dotted keys, inline tables (whose keys map to the line
    of the table), multi-line strings skipped.
    """

    _HEADER_RE = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
    _KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                         r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")

    def __init__(self, text: str) -> None:
        self.lines: dict[Key, int] = {}
        self._counts: dict[tuple[str, ...], int] = {}
        table: Key = ()
        in_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = self._HEADER_RE.match(line)
            if header and not self._KEY_RE.match(line):
                names = tuple(self._split(header.group(2)))
                table = self._resolve(names)
                if header.group(1) == "[[":
                    index = self._counts.get(names, 0)
                    self._counts[names] = index + 1
                    table = (*table, index)
                self.lines.setdefault(table, number)
                continue
            key = self._KEY_RE.match(line)
            if key:
                self.lines.setdefault((*table, *self._split(key.group(1))), number)
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2 == 1:
                        in_string = quote

    def _resolve(self, names: tuple[str, ...]) -> Key:
        # [streams.policy] after [[streams]] belongs to the last streams entry.
        out: list[str | int] = []
        for i, name in enumerate(names):
            out.append(name)
            count = self._counts.get(names[: i + 1], 0)
            if count and i < len(names) - 1:
                out.append(count - 1)
        return tuple(out)

    @staticmethod
    def _split(dotted: str) -> list[str]:
        parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", dotted)
        return [p[1:-1] if p[:1] in "\"'" else p for p in parts]

    def line_of(self, key: Key) -> int:
        """The line of *key*, else of its nearest enclosing table that has one, else 1."""
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines:
                return self.lines[key[:n]]
        return 1


def format_key(key: Key) -> str:
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            bare = re.fullmatch(r"[A-Za-z0-9_-]+", part) is not None
            out += (("." if out else "") + part) if bare else f"[{part!r}]"
    return out


class _Parser:
    def __init__(self, text: str, label: str, path: Path | None) -> None:
        self.locator = KeyLocator(text)
        self.label = label
        self.base = path.parent if path is not None else Path.cwd()
        self.path = path

    def error(self, key: Key, message: str) -> UserError:
        where = f"{self.label}:{self.locator.line_of(key)}"
        return UserError(f"{format_key(key)}: {message}" if key else message, where=where)

    # Typed accessors: each names the key it reads in its error.

    def table(self, value: object, key: Key) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_kind(value)}")
        return value

    def check_keys(self, table: Mapping[str, Any], allowed: frozenset[str], key: Key) -> None:
        for name in table:
            if name not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.error((*key, name), f"unknown key (expected one of: {hint})")

    def string(self, table: Mapping[str, Any], name: str, key: Key,
               default: str | None = None, *, required: bool = False) -> str | None:
        if name not in table:
            if required:
                raise self.error(key, f"missing required key {name!r}")
            return default
        value = table[name]
        if not isinstance(value, str) or not value.strip():
            raise self.error((*key, name), f"expected a non-empty string, got {_kind(value)}")
        return value

    def required_string(self, table: Mapping[str, Any], name: str, key: Key) -> str:
        value = self.string(table, name, key, required=True)
        assert value is not None  # required=True raised otherwise
        return value

    def boolean(self, table: Mapping[str, Any], name: str, key: Key, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise self.error((*key, name), f"expected true or false, got {_kind(value)}")
        return value

    def strings(self, table: Mapping[str, Any], name: str, key: Key,
                default: tuple[str, ...] = ()) -> tuple[str, ...]:
        if name not in table:
            return default
        value = table[name]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error((*key, name), f"expected a list of strings, got {_kind(value)}")
        return tuple(value)

    def choices(self, table: Mapping[str, Any], name: str, key: Key,
                allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.strings(table, name, key, default)
        for v in values:
            if v not in allowed:
                raise self.error((*key, name), f"unknown value {v!r} (expected: "
                                 f"{', '.join(allowed)})")
        return values

    # Sections.

    def parse(self, data: dict[str, Any]) -> Config:
        self.check_keys(data, _TOP_KEYS, ())
        store_url = self.parse_store(data.get("store", {}))
        sources = self.parse_sources(data.get("sources", []))
        modules = self.parse_modules(data.get("modules", {}))
        streams = self.parse_streams(data.get("streams", []), modules)
        notify = self.parse_notify(data.get("notify", {}))
        return Config(self.path, store_url, sources, modules, streams, notify)

    def parse_store(self, value: object) -> str:
        key: Key = ("store",)
        table = self.table(value, key)
        self.check_keys(table, frozenset({"url"}), key)
        url = self.string(table, "url", key)
        if url is None:
            return f"sqlite:///{self.base / DEFAULT_DB_NAME}"
        if "://" not in url:
            raise self.error((*key, "url"), f"expected a database URL like sqlite:///path or "
                             f"postgresql://host/db, got {url!r}")
        m = re.match(r"^(sqlite[+\w]*):///(?!/)(.+)$", url)
        if m and m.group(2) != ":memory:" and not m.group(2).startswith("/"):
            # A relative SQLite path means: next to the configuration file.
            return f"{m.group(1)}:///{self.base / m.group(2)}"
        return url

    def parse_sources(self, value: object) -> tuple[SourceConfig, ...]:
        if not isinstance(value, list):
            raise self.error(("sources",), "expected [[sources]] tables")
        out: list[SourceConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(value):
            key: Key = ("sources", i)
            table = self.table(item, key)
            name = self.required_string(table, "name", key)
            if name in seen:
                raise self.error((*key, "name"), f"duplicate source name {name!r}")
            seen.add(name)
            kind = self.required_string(table, "type", key)
            if kind not in SOURCE_TYPES:
                raise self.error((*key, "type"), f"unknown source type {kind!r} (expected: "
                                 f"{', '.join(SOURCE_TYPES)})")
            self.check_keys(table, _COMMON_SOURCE_KEYS | _SOURCE_KEYS[kind], key)
            path = None
            if kind == "directory":
                raw = self.required_string(table, "path", key)
                path = (self.base / raw).resolve()
            baseurl = self.required_string(table, "baseurl", key) if kind == "rpm" else None
            out.append(SourceConfig(
                name=name,
                type=kind,
                side_band=self.boolean(table, "side_band", key, False),
                line=self.string(table, "line", key),
                flavour=self.string(table, "flavour", key),
                pattern=self.string(table, "pattern", key, "*") or "*",
                baseurl=baseurl,
                package=self.string(table, "package", key, "kernel-devel") or "kernel-devel",
                path=path,
            ))
        return tuple(out)

    def parse_modules(self, value: object) -> dict[str, ModuleConfig]:
        modules = self.table(value, ("modules",))
        out: dict[str, ModuleConfig] = {}
        for name, item in modules.items():
            key: Key = ("modules", name)
            if not _NAME_RE.match(name):
                raise self.error(key, "a module name is letters, digits and _.+-")
            table = self.table(item, key)
            self.check_keys(table, _MODULE_KEYS, key)
            maintainers = self.strings(table, "maintainers", key)
            for address in maintainers:
                if not _EMAIL_RE.match(address):
                    raise self.error((*key, "maintainers"),
                                     f"not an email address: {address!r}")
            out[name] = ModuleConfig(
                name=name,
                source=self.required_string(table, "source", key),
                maintainers=maintainers,
                required=self.boolean(table, "required", key, True),
                tags=self.strings(table, "tags", key),
            )
        return out

    def parse_streams(self, value: object,
                      modules: Mapping[str, ModuleConfig]) -> tuple[StreamConfig, ...]:
        if not isinstance(value, list):
            raise self.error(("streams",), "expected [[streams]] tables, in promotion order")
        out: list[StreamConfig] = []
        seen: set[str] = set()
        tags = {t for m in modules.values() for t in m.tags}
        for i, item in enumerate(value):
            key: Key = ("streams", i)
            table = self.table(item, key)
            self.check_keys(table, _STREAM_KEYS, key)
            name = self.required_string(table, "name", key)
            if not _NAME_RE.match(name):
                raise self.error((*key, "name"), "a stream name is letters, digits and _.+-")
            if name in seen:
                raise self.error((*key, "name"), f"duplicate stream {name!r}")
            seen.add(name)
            kinds = self.choices(table, "kinds", key, KINDS, ("abi",))
            if not kinds:
                raise self.error((*key, "kinds"), "name at least one check kind")
            selector = self.parse_module_selector(table.get("modules", "required"),
                                                  (*key, "modules"), modules, tags)
            soak_raw = table.get("min_soak", 0)
            soak = parse_duration(soak_raw)
            if soak is None:
                raise self.error((*key, "min_soak"), 'expected a duration like "3d", "12h" or '
                                 f'"1d12h", got {soak_raw!r}')
            if soak and i == 0:
                raise self.error((*key, "min_soak"),
                                 "the first stream has no previous stream to soak in")
            out.append(StreamConfig(name, PolicyConfig(
                kinds=kinds,
                modules=selector,
                min_soak=soak,
                forbid_older=self.boolean(table, "forbid_older", key, False),
            )))
        return tuple(out)

    def parse_module_selector(self, value: object, key: Key,
                              modules: Mapping[str, ModuleConfig],
                              tags: set[str]) -> str | tuple[str, ...]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            for name in value:
                if name not in modules:
                    raise self.error(key, f"unknown module {name!r} (not under [modules])")
            return tuple(value)
        if value == "required":
            return "required"
        if isinstance(value, str) and value.startswith("tag:") and len(value) > 4:
            if value[4:] not in tags:
                raise self.error(key, f"no module has the tag {value[4:]!r}")
            return value
        raise self.error(key, 'expected "required", "tag:<tag>" or a list of module names, '
                         f"got {value!r}")

    def parse_notify(self, value: object) -> NotifyConfig:
        key: Key = ("notify",)
        table = self.table(value, key)
        self.check_keys(table, frozenset({"email", "webhooks"}), key)
        email = self.parse_email(table["email"]) if "email" in table else None
        hooks_raw = table.get("webhooks", [])
        if not isinstance(hooks_raw, list):
            raise self.error((*key, "webhooks"), "expected [[notify.webhooks]] tables")
        hooks = tuple(self.parse_webhook(h, (*key, "webhooks", i))
                      for i, h in enumerate(hooks_raw))
        return NotifyConfig(email, hooks)

    def secret(self, table: Mapping[str, Any], name: str, key: Key) -> str | None:
        """A secret given inline, or (better: the file can be shared) by environment variable."""
        inline = self.string(table, name, key)
        env_name = self.string(table, f"{name}_env", key)
        if inline and env_name:
            raise self.error((*key, f"{name}_env"), f"give {name} or {name}_env, not both")
        if env_name:
            env_value = os.environ.get(env_name)
            if not env_value:
                raise self.error((*key, f"{name}_env"),
                                 f"environment variable {env_name} is not set")
            return env_value
        return inline

    def parse_email(self, value: object) -> EmailConfig:
        key: Key = ("notify", "email")
        table = self.table(value, key)
        self.check_keys(table, _EMAIL_KEYS, key)
        port = table.get("port", 25)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise self.error((*key, "port"), f"expected a port number, got {port!r}")
        sender = self.required_string(table, "from", key)
        recipients = self.strings(table, "to", key)
        for address in (sender, *recipients):
            if not _EMAIL_RE.match(address.rsplit("<", 1)[-1].rstrip(">")):
                raise self.error((*key, "from" if address == sender else "to"),
                                 f"not an email address: {address!r}")
        username = self.string(table, "username", key)
        password = self.secret(table, "password", key)
        if password and not username:
            raise self.error((*key, "password"), "a password needs a username")
        return EmailConfig(
            host=self.required_string(table, "host", key),
            sender=sender,
            port=port,
            starttls=self.boolean(table, "starttls", key, False),
            username=username,
            password=password,
            recipients=recipients,
            maintainers=self.boolean(table, "maintainers", key, True),
            events=self.choices(table, "events", key, EVENT_KINDS, EVENT_KINDS),
        )

    def parse_webhook(self, value: object, key: Key) -> WebhookConfig:
        table = self.table(value, key)
        self.check_keys(table, _WEBHOOK_KEYS, key)
        url = self.required_string(table, "url", key)
        if not re.match(r"^https?://", url):
            raise self.error((*key, "url"), f"expected an http:// or https:// URL, got {url!r}")
        timeout = table.get("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise self.error((*key, "timeout"), f"expected seconds > 0, got {timeout!r}")
        return WebhookConfig(
            url=url,
            secret=self.secret(table, "secret", key),
            events=self.choices(table, "events", key, EVENT_KINDS, EVENT_KINDS),
            timeout=float(timeout),
        )


def _kind(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)
