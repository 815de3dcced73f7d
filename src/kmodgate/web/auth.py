"""Who may change things: bearer tokens checked against the configured hashes,
an audit record of every change, and the cross-site checks forms need.

A token is compared by its sha256 (constant-time), so the configuration never
holds a usable secret.  Browser forms carry the token in a password field,
never in a cookie: a cross-site page cannot submit what it does not know.  They
also carry a double-submit CSRF value (cookie + hidden field) and are refused
when the browser says the request came from another origin.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

from kmodgate.web.settings import WebSettings

audit_logger = logging.getLogger("kmodgate.web.audit")

CSRF_COOKIE = "kmodgate_csrf"
CSRF_FIELD = "csrf"


class AuthError(Exception):
    """401 or 403, reported as a problem document."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Actor:
    name: str  # the token's name: recorded as the author of the change


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def authenticate(settings: WebSettings, token: str | None) -> Actor:
    """The holder of *token*; AuthError 401 if missing or unknown."""
    if not token:
        raise AuthError(401, "this needs a bearer token (Authorization: Bearer <token>)")
    digest = token_hash(token)
    found: Actor | None = None
    for entry in settings.tokens:
        # Compare with every entry, so timing says nothing about which matched.
        if hmac.compare_digest(digest, entry.sha256):
            found = Actor(entry.name)
    if found is None:
        raise AuthError(401, "unknown token")
    return found


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def require_reader(settings: WebSettings, request: Request) -> None:
    """Reads are open unless configured otherwise; then any valid token may read."""
    if settings.open_reads:
        return
    authenticate(settings, bearer_token(request))


class Auditor:
    """Every change, one JSON line: to the log, and to the audit file if configured."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # one writer at a time keeps the lines whole

    def record(self, actor: Actor, action: str, target: dict[str, Any], now: datetime,
               request: Request | None = None) -> None:
        entry = {"at": now.isoformat(), "actor": actor.name, "action": action,
                 "target": target,
                 "client": request.client.host if request and request.client else None}
        line = json.dumps(entry, sort_keys=True, default=str)
        audit_logger.info(line)
        if self.settings.audit_log is not None:
            with self._lock:
                self.settings.audit_log.parent.mkdir(parents=True, exist_ok=True)
                with self.settings.audit_log.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")


def new_csrf_value() -> str:
    return secrets.token_urlsafe(24)


def check_form_origin(request: Request, csrf_field: str | None) -> None:
    """Refuse a form post another site made the browser send."""
    # Sec-Fetch-Site and Origin are set by the browser, not by page scripts.
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise AuthError(403, "cross-site form submission refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise AuthError(403, "form posted from another origin")
    elif origin == "null":
        raise AuthError(403, "form posted from an opaque origin")
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie or not csrf_field or not hmac.compare_digest(cookie, csrf_field):
        raise AuthError(403, "the form's CSRF value is missing or stale: reload the page")
