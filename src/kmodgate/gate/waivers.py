"""Waivers: a person says a failing (or missing) result must not block, within
a scope (module, kernel pattern, kind), for a reason, until it expires.

An expired or revoked waiver stops applying on its own; every decision lists
the waivers it used, so nothing is let through silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from kmodgate.errors import UserError
from kmodgate.results import KINDS
from kmodgate.store.models import Waiver

ANY = "*"


@dataclass(frozen=True)
class WaiverScope:
    module: str  # a module name or a glob ("*" for all)
    kernel_pattern: str  # a glob over kernel releases: "6.1.0-5?-amd64"
    kind: str = ANY  # a check kind or "*"


def add_waiver(session: Session, scope: WaiverScope, *, reason: str, author: str,
               now: datetime, expires_at: datetime | None = None,
               duration: timedelta | None = None) -> Waiver:
    """Record a waiver; it needs a reason, an author, and an expiry in the future."""
    if not reason.strip():
        raise UserError("a waiver needs a reason")
    if not author.strip():
        raise UserError("a waiver needs an author")
    if scope.kind != ANY and scope.kind not in KINDS:
        raise UserError(f"unknown check kind {scope.kind!r} (expected: {', '.join(KINDS)}, *)")
    if not scope.module.strip() or not scope.kernel_pattern.strip():
        raise UserError("a waiver needs a module and a kernel pattern (use * for all)")
    if expires_at is not None and duration is not None:
        raise UserError("give a waiver an expiry time or a duration, not both")
    if duration is not None:
        expires_at = now + duration
    if expires_at is not None and expires_at <= now:
        raise UserError(f"the waiver would expire in the past ({expires_at.isoformat()})")
    waiver = Waiver(module=scope.module, kernel_pattern=scope.kernel_pattern, kind=scope.kind,
                    reason=reason.strip(), author=author.strip(), created_at=now,
                    expires_at=expires_at, revoked_at=None)
    session.add(waiver)
    session.flush()
    return waiver


def revoke_waiver(session: Session, waiver_id: int, now: datetime) -> Waiver:
    waiver = session.get(Waiver, waiver_id)
    if waiver is None:
        raise UserError(f"no waiver #{waiver_id}")
    if waiver.revoked_at is None:
        waiver.revoked_at = now
    return waiver


def active_waivers(session: Session, now: datetime) -> list[Waiver]:
    """Waivers in force at *now*: created by then, not revoked, not expired."""
    return list(session.scalars(
        select(Waiver)
        .where(Waiver.created_at <= now)
        .where(or_(Waiver.revoked_at.is_(None), Waiver.revoked_at > now))
        .where(or_(Waiver.expires_at.is_(None), Waiver.expires_at > now))
        .order_by(Waiver.id)
    ))


def all_waivers(session: Session) -> list[Waiver]:
    return list(session.scalars(select(Waiver).order_by(Waiver.id)))


def in_force(w: Waiver | WaiverFact, now: datetime) -> bool:
    """Created by *now*, and neither revoked nor expired by then."""
    return (w.created_at <= now and (w.revoked_at is None or w.revoked_at > now)
            and (w.expires_at is None or w.expires_at > now))


@dataclass(frozen=True)
class WaiverFact:
    """A waiver as a decision reads it: a plain value, safe to keep in a cache
    and to share between threads, unlike the ORM row it was read from."""

    id: int
    module: str
    kernel_pattern: str
    kind: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    json: dict[str, Any]

    @classmethod
    def of(cls, w: Waiver) -> WaiverFact:
        return cls(id=w.id, module=w.module, kernel_pattern=w.kernel_pattern, kind=w.kind,
                   created_at=w.created_at, expires_at=w.expires_at, revoked_at=w.revoked_at,
                   json=waiver_json(w))

    def covers(self, module: str, kernel: str, kind: str) -> bool:
        return (fnmatchcase(module, self.module)
                and fnmatchcase(kernel, self.kernel_pattern)
                and (self.kind == ANY or self.kind == kind))


def waivers_not_over(session: Session, now: datetime) -> list[WaiverFact]:
    """The waivers not over at *now* (revoked or expired): those in force at
    *now* and those that may come into force later (created in *now*'s
    future), oldest first."""
    rows = session.scalars(
        select(Waiver)
        .where(or_(Waiver.revoked_at.is_(None), Waiver.revoked_at > now))
        .where(or_(Waiver.expires_at.is_(None), Waiver.expires_at > now))
        .order_by(Waiver.id)
    )
    return [WaiverFact.of(w) for w in rows]


def matching_waiver(waivers: list[WaiverFact], module: str, kernel: str, kind: str,
                    now: datetime) -> WaiverFact | None:
    """The first (oldest) waiver in force at *now* covering the cell, if any."""
    for w in waivers:
        if w.covers(module, kernel, kind) and in_force(w, now):
            return w
    return None


def waiver_json(w: Waiver, now: datetime | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": w.id,
        "module": w.module,
        "kernel_pattern": w.kernel_pattern,
        "kind": w.kind,
        "reason": w.reason,
        "author": w.author,
        "created_at": w.created_at.isoformat(),
        "expires_at": w.expires_at.isoformat() if w.expires_at else None,
        "revoked_at": w.revoked_at.isoformat() if w.revoked_at else None,
    }
    if now is not None:
        out["active"] = in_force(w, now)
    return out
