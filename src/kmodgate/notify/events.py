"""Events worth telling people about, noticed from the store.

Each event has a natural key ("regression <module> <kind> <line>
<first-bad>"), unique in the store: noticing it again inserts nothing and so
queues nothing, however often or concurrently kmodgate runs.  Creating an
event queues one outbox row per recipient in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kmodgate.abi.compression import decompress
from kmodgate.config import Config
from kmodgate.errors import KmodgateError
from kmodgate.gate.policy import status
from kmodgate.gate.regressions import Regression, find_regressions
from kmodgate.store.models import DecisionState, Delivery, Event
from kmodgate.store.queries import insert_ignore

EMAIL = "email"
WEBHOOK = "webhook"

LOG_EXCERPT_LINES = 30

_FAILS = {"build": "fails to build on", "abi": "fails the ABI check on",
          "load": "fails to load on"}
_FIXED = {"build": "builds again on", "abi": "passes the ABI check again on",
          "load": "loads again on"}


@dataclass(frozen=True)
class Message:
    """One event on its way to one recipient: what a sender needs."""

    delivery_id: int
    event_id: int
    key: str
    kind: str
    module: str | None
    payload: dict[str, Any]
    created_at: datetime
    channel: str
    recipient: str

    def document(self) -> dict[str, Any]:
        """The event as JSON, the same for every channel."""
        return {"id": self.event_id, "key": self.key, "kind": self.kind, "module": self.module,
                "created_at": self.created_at.isoformat(), "subject": subject(self),
                "payload": self.payload}


def recipients(config: Config, kind: str, module: str | None) -> list[tuple[str, str]]:
    """(channel, recipient) pairs for an event: configured lists, a module's
    maintainers for its own events, every webhook that wants the kind."""
    out: list[tuple[str, str]] = []
    email = config.notify.email
    if email is not None and kind in email.events:
        addresses = list(email.recipients)
        if email.maintainers and module is not None and module in config.modules:
            addresses += config.modules[module].maintainers
        out += [(EMAIL, a) for a in dict.fromkeys(addresses)]
    for hook in config.notify.webhooks:
        if kind in hook.events:
            out.append((WEBHOOK, hook.url))
    return list(dict.fromkeys(out))


def emit(session: Session, *, key: str, kind: str, module: str | None,
         payload: dict[str, Any], to: Iterable[tuple[str, str]], now: datetime) -> Event | None:
    """Create the event and queue its deliveries, unless it exists: then None."""
    if not insert_ignore(session, Event, {"key": key, "kind": kind, "module": module,
                                          "payload": payload, "created_at": now}, ("key",)):
        return None
    event = session.scalars(select(Event).where(Event.key == key)).one()
    for channel, recipient in to:
        insert_ignore(session, Delivery, {
            "event_id": event.id, "channel": channel, "recipient": recipient, "attempts": 0,
            "next_attempt_at": now,
        }, ("event_id", "channel", "recipient"))
    return event


def regression_key(r: Regression) -> str:
    return f"regression {r.module} {r.kind} {r.line} {r.first_bad}"


def fix_key(r: Regression) -> str:
    return f"fix {r.module} {r.kind} {r.line} {r.first_bad} {r.fixed_in}"


def emit_regression_events(session: Session, config: Config, now: datetime) -> list[Event]:
    """An event for each open regression, and a fix for each one people were told about.

    A regression that opened and closed before anyone noticed (both results
    arrived in one sync) is history, not news: it gets no event.
    """
    out: list[Event] = []
    modules = list(config.modules) or None
    for r in find_regressions(session, modules=modules):
        if r.is_open:
            payload = {**r.to_json(), "log_excerpt": log_excerpt(r.log_path)}
            event = emit(session, key=regression_key(r), kind="regression", module=r.module,
                         payload=payload, to=recipients(config, "regression", r.module),
                         now=now)
        else:
            told = session.scalars(select(Event.id).where(Event.key == regression_key(r)))
            if told.first() is None:
                continue
            event = emit(session, key=fix_key(r), kind="fix", module=r.module,
                         payload=r.to_json(), to=recipients(config, "fix", r.module), now=now)
        if event is not None:
            out.append(event)
    return out


def emit_decision_events(session: Session, config: Config, now: datetime) -> list[Event]:
    """An event when a candidate's gate decision changes (blocked <-> allowed).

    The first decision on a kernel is news only if it is "allowed": a blocked
    newcomer is already explained by its regression events.
    """
    out: list[Event] = []
    for stream in status(session, config, now):
        for line in stream["lines"]:
            for cand in line["candidates"]:
                event = _note_decision(session, config, stream["stream"], line["line"], cand,
                                       now)
                if event is not None:
                    out.append(event)
    return out


def _note_decision(session: Session, config: Config, stream: str, line: str,
                   cand: dict[str, Any], now: datetime) -> Event | None:
    kernel, allowed = cand["kernel"], bool(cand["allowed"])
    insert_ignore(session, DecisionState, {"kernel": kernel, "stream": stream,
                                           "allowed": allowed, "version": 0,
                                           "updated_at": now}, ("kernel", "stream"))
    state = session.scalars(
        select(DecisionState).where(DecisionState.kernel == kernel,
                                    DecisionState.stream == stream).with_for_update()
    ).one()
    if state.version == 0:
        state.version = 1
        if not allowed:
            return None
    elif state.allowed == allowed:
        return None
    else:
        state.version += 1
    state.allowed = allowed
    state.updated_at = now
    payload = {"kernel": kernel, "stream": stream, "line": line, "allowed": allowed,
               "blockers": cand["blockers"], "waivers": cand["waivers"]}
    return emit(session, key=f"decision {stream} {kernel} {state.version}", kind="decision",
                module=None, payload=payload, to=recipients(config, "decision", None), now=now)


def emit_events(session: Session, config: Config, now: datetime) -> list[Event]:
    return emit_regression_events(session, config, now) + emit_decision_events(
        session, config, now)


def log_excerpt(log_path: str | None, lines: int = LOG_EXCERPT_LINES) -> str:
    """The part of a check's log a maintainer reads first: around the first
    error if there is one, else the end.  Empty if the log is gone."""
    if not log_path:
        return ""
    try:
        raw = Path(log_path).read_bytes()
        text = decompress(raw, log_path).decode("utf-8", "replace")
    except (OSError, KmodgateError):
        return ""
    all_lines = text.splitlines()
    for i, line in enumerate(all_lines):
        if "error:" in line or "ERROR:" in line:
            start = max(0, i - 5)
            return "\n".join(all_lines[start:start + lines])
    return "\n".join(all_lines[-lines:])


def subject(m: Message) -> str:
    p = m.payload
    if m.kind == "regression":
        verb = _FAILS.get(p["kind"], f"fails the {p['kind']} check on")
        return f"[kmodgate] {p['module']} {verb} {p['first_bad']}"
    if m.kind == "fix":
        verb = _FIXED.get(p["kind"], f"passes the {p['kind']} check again on")
        return f"[kmodgate] {p['module']} {verb} {p['fixed_in']}"
    if m.kind == "decision":
        state = "may now enter" if p["allowed"] else "is now blocked from"
        return f"[kmodgate] {p['kernel']} {state} {p['stream']}"
    return f"[kmodgate] {m.key}"


def body(m: Message) -> str:
    """Plain text a maintainer can act on without opening anything else."""
    p = m.payload
    out: list[str] = []
    if m.kind in ("regression", "fix"):
        out.append(f"Module:     {p['module']} ({p.get('module_version') or 'unknown version'})")
        out.append(f"Check:      {p['kind']}")
        out.append(f"Line:       {p['line']}")
        out.append(f"First bad:  {p['first_bad']}")
        out.append(f"Last good:  {p['last_good'] or 'none (it never passed on this line)'}")
        if m.kind == "fix":
            out.append(f"Fixed in:   {p['fixed_in']}")
        out.append("")
        out.append("Reason:")
        out += [f"  {r.get('message', r.get('code', ''))}" for r in p.get("reasons", [])[:10]]
        changes = p.get("changes") or []
        if changes and p["kind"] == "abi":
            out.append("")
            out.append("Symbols the module uses that changed:")
            out += [f"  {c['symbol']}: {c['change']}" for c in changes if "symbol" in c]
        if p.get("reproducer"):
            out += ["", "Reproduce:", f"  {p['reproducer']}"]
        if p.get("log_excerpt"):
            out += ["", "Log excerpt:", *[f"  {x}" for x in p["log_excerpt"].splitlines()]]
    elif m.kind == "decision":
        out.append(f"Kernel:  {p['kernel']} ({p['line']})")
        out.append(f"Stream:  {p['stream']}")
        out.append(f"Allowed: {'yes' if p['allowed'] else 'no'}")
        if p.get("blockers"):
            out += ["", "Blocked by:", *[f"  {b}" for b in p["blockers"]]]
        if p.get("waivers"):
            out += ["", "Waivers used: " + ", ".join(f"#{w}" for w in p["waivers"])]
    out += ["", "-- ", f"kmodgate event {m.key}"]
    return "\n".join(out) + "\n"
