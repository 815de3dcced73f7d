"""The web front end's settings: the ``[web]`` table of kmodgate.toml, or
environment variables.

config.py owns the rest of the file; this parser reads only ``[web]`` from
the same text, with the same kind of one-line errors naming the key and its
line.  Tokens are never written down: the file holds their sha256 hashes, so a
leaked configuration grants nothing.

Example::

    [web]
    reads = "open"                 # or "token": reads need a token too
    audit_log = "kmodgate-audit.jsonl"   # every change, one JSON line (relative: next to the file)

    [[web.tokens]]
    name = "release-team"          # recorded as the author of what it changes
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

Environment (overrides the file): ``KMODGATE_WEB_TOKENS`` = ``name:sha256[,name:sha256…]``,
``KMODGATE_WEB_READS`` = ``open`` or ``token``, ``KMODGATE_WEB_AUDIT_LOG`` = a path.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodgate.config import KeyLocator, format_key, read_config_text
from kmodgate.errors import UserError

READS = ("open", "token")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")
_WEB_KEYS = frozenset({"reads", "tokens", "audit_log"})
_TOKEN_KEYS = frozenset({"name", "sha256"})


@dataclass(frozen=True)
class TokenHash:
    name: str  # who holds it: recorded as the author of every change made with it
    sha256: str  # lower-case hex of sha256(token)


@dataclass(frozen=True)
class WebSettings:
    tokens: tuple[TokenHash, ...] = ()
    reads: str = "open"  # "open": anyone may read; "token": reads need a token too
    audit_log: Path | None = None  # one JSON line per change, besides the log record

    @property
    def open_reads(self) -> bool:
        return self.reads == "open"


def load_web_settings(path: str | Path | None, env: Mapping[str, str] | None = None
                      ) -> WebSettings:
    """The [web] table of the configuration at *path* (if any), then the environment."""
    settings = WebSettings()
    if path is not None:
        settings = parse_web_settings(read_config_text(path), Path(path))
    return apply_environment(settings, os.environ if env is None else env)


def parse_web_settings(text: str, path: str | Path | None = None) -> WebSettings:
    label = str(path) if path is not None else "kmodgate.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"invalid TOML: {exc}", where=label) from None
    web = data.get("web")
    if web is None:
        return WebSettings()
    locator = KeyLocator(text)

    def error(key: tuple[str | int, ...], message: str) -> UserError:
        return UserError(f"{format_key(key)}: {message}",
                         where=f"{label}:{locator.line_of(key)}")

    if not isinstance(web, dict):
        raise error(("web",), "expected a table")
    for name in web:
        if name not in _WEB_KEYS:
            raise error(("web", name), f"unknown key (expected one of: "
                                       f"{', '.join(sorted(_WEB_KEYS))})")
    reads = web.get("reads", "open")
    if reads not in READS:
        raise error(("web", "reads"), f"expected one of {', '.join(READS)}, got {reads!r}")
    audit: Path | None = None
    if "audit_log" in web:
        if not isinstance(web["audit_log"], str) or not web["audit_log"].strip():
            raise error(("web", "audit_log"), "expected a path")
        audit = Path(web["audit_log"])
        if not audit.is_absolute() and path is not None:
            audit = Path(path).resolve().parent / audit  # as the store: next to the file
    raw_tokens = web.get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise error(("web", "tokens"), "expected an array of tables ([[web.tokens]])")
    tokens: list[TokenHash] = []
    for i, entry in enumerate(raw_tokens):
        key: tuple[str | int, ...] = ("web", "tokens", i)
        if not isinstance(entry, dict):
            raise error(key, "expected a table with name and sha256")
        for name in entry:
            if name not in _TOKEN_KEYS:
                raise error((*key, name), "unknown key (expected one of: name, sha256)")
        tokens.append(_token(entry, key, error))
    names = [t.name for t in tokens]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise error(("web", "tokens", i, "name"), f"token name {name!r} used twice")
    return WebSettings(tokens=tuple(tokens), reads=str(reads), audit_log=audit)


def _token(entry: dict[str, Any], key: tuple[str | int, ...], error: Any) -> TokenHash:
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise error((*key, "name"), "expected a name like \"release-team\"")
    if not isinstance(digest, str) or not _HASH_RE.match(digest.lower()):
        raise error((*key, "sha256"), "expected the 64 hex digits of the token's sha256 "
                                      "(never the token itself)")
    return TokenHash(name=name, sha256=digest.lower())


def apply_environment(settings: WebSettings, env: Mapping[str, str]) -> WebSettings:
    tokens, reads, audit = settings.tokens, settings.reads, settings.audit_log
    if env.get("KMODGATE_WEB_TOKENS"):
        parsed: list[TokenHash] = []
        for item in env["KMODGATE_WEB_TOKENS"].split(","):
            name, _, digest = item.strip().partition(":")
            if not _NAME_RE.match(name) or not _HASH_RE.match(digest.lower()):
                raise UserError("KMODGATE_WEB_TOKENS: expected name:sha256[,name:sha256…]")
            parsed.append(TokenHash(name, digest.lower()))
        tokens = tuple(parsed)
    if env.get("KMODGATE_WEB_READS"):
        reads = env["KMODGATE_WEB_READS"]
        if reads not in READS:
            raise UserError(f"KMODGATE_WEB_READS: expected one of {', '.join(READS)}, "
                            f"got {reads!r}")
    if env.get("KMODGATE_WEB_AUDIT_LOG"):
        audit = Path(env["KMODGATE_WEB_AUDIT_LOG"])
    return WebSettings(tokens=tokens, reads=reads, audit_log=audit)
