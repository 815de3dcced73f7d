"""Gate decisions: may this kernel enter that stream?

A decision is computed on every call from the stream's policy, the time,
and what is stored (results, waivers, promotions, pins: the DecisionFacts of
kmodgate.gate.facts, which may come from a cache that the store's generation
keeps exact), so it cannot go stale.  Its JSON follows Fedora's Greenwave:
``allowed``, ``satisfied``, ``unsatisfied`` (module, kind, outcome, reasons),
``waived`` (with the waiver used) and ``soak``, plus what else blocks (a pin,
an older kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from kmodgate.abi.compare import Outcome
from kmodgate.config import Config, StreamConfig
from kmodgate.errors import UserError
from kmodgate.gate.facts import DecisionFacts, gather, pin_json, require_kernel
from kmodgate.gate.streams import (
    active_pin,
    active_pins,
    current_promotion,
    is_older,
    kernels_by_line,
    promotion_history,
)
from kmodgate.gate.waivers import matching_waiver
from kmodgate.store.models import Pin, Promotion

MISSING = "missing"  # no result yet: blocks like a failure, but it is not the module's fault
PASSING = frozenset({Outcome.PASS.value, Outcome.SKIP.value})  # skip: not applicable

# (session, kernel, now) -> the facts to decide on: gather, or a cache of it.
FactsReader = Callable[[Session, str, datetime], DecisionFacts]

__all__ = ["Decision", "decide", "evaluate", "pin", "pin_json", "promote", "require_kernel",
           "status", "unpin"]


@dataclass
class Decision:
    kernel: str
    stream: str
    line: str
    allowed: bool
    satisfied: list[dict[str, Any]] = field(default_factory=list)
    unsatisfied: list[dict[str, Any]] = field(default_factory=list)
    waived: list[dict[str, Any]] = field(default_factory=list)
    soak: dict[str, Any] = field(default_factory=dict)
    pin: dict[str, Any] | None = None
    current: dict[str, Any] | None = None  # the stream's kernel on this line, if any
    blockers: list[str] = field(default_factory=list)  # one line each, for people

    @property
    def waiver_ids(self) -> list[int]:
        return sorted({int(w["waiver"]["id"]) for w in self.waived})

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "stream": self.stream,
            "line": self.line,
            "allowed": self.allowed,
            "satisfied": self.satisfied,
            "unsatisfied": self.unsatisfied,
            "waived": self.waived,
            "waivers": self.waiver_ids,
            "soak": self.soak,
            "pin": self.pin,
            "current": self.current,
            "blockers": self.blockers,
        }


def decide(session: Session, config: Config, release: str, stream: str,
           now: datetime) -> Decision:
    """Whether *release* may enter *stream* at *now*, and why (not)."""
    config.stream(stream)  # an unknown stream is the first thing to say
    return evaluate(config, gather(session, config, release, now), stream, now)


def evaluate(config: Config, facts: DecisionFacts, stream: str, now: datetime) -> Decision:
    """The decision *stream*'s policy makes on *facts* at *now*: no store needed."""
    target = config.stream(stream)
    decision = Decision(kernel=facts.kernel.release, stream=target.name,
                        line=facts.kernel.line, allowed=False)
    _check_results(config, target, facts, now, decision)
    _check_soak(config, target, facts, now, decision)
    _check_current(target, facts, decision)
    _check_pin(target, facts, decision)
    decision.allowed = not decision.blockers
    return decision


def _check_results(config: Config, target: StreamConfig, facts: DecisionFacts,
                   now: datetime, decision: Decision) -> None:
    release = facts.kernel.release
    for module in config.policy_modules(target.name):
        build = facts.results.get((module, "build"))
        for kind in target.policy.kinds:
            result = facts.results.get((module, kind))
            cell: dict[str, Any] = {"module": module, "kind": kind}
            if result is None and kind != "build" and build is not None \
                    and build.outcome == "fail":
                # abi and load check the binaries a build made: there are none.
                cell["outcome"] = MISSING
                cell["reasons"] = [{"code": "no_binary",
                                    "message": f"no {kind} result for {module} on "
                                               f"{release}: it did not build there"}]
            elif result is None:
                cell["outcome"] = MISSING
                cell["reasons"] = [{"code": "result_missing",
                                    "message": f"no {kind} result for {module} on "
                                               f"{release} yet"}]
            else:
                cell["outcome"] = result.outcome
                cell["module_version"] = result.module_version
                cell["reasons"] = list(result.reasons)
            if cell["outcome"] in PASSING:
                cell.pop("reasons", None)
                decision.satisfied.append(cell)
                continue
            waiver = matching_waiver(facts.waivers, module, release, kind, now)
            if waiver is not None:
                decision.waived.append({**cell, "waiver": waiver.json})
            else:
                decision.unsatisfied.append(cell)
    if decision.unsatisfied:
        cells = ", ".join(f"{c['module']} {c['kind']} {c['outcome']}"
                          for c in decision.unsatisfied)
        decision.blockers.append(f"{len(decision.unsatisfied)} unsatisfied: {cells}")


def _check_soak(config: Config, target: StreamConfig, facts: DecisionFacts, now: datetime,
                decision: Decision) -> None:
    previous = config.previous_stream(target.name)
    required = target.policy.min_soak
    soak: dict[str, Any] = {
        "previous_stream": previous.name if previous else None,
        "required_seconds": int(required.total_seconds()),
        "entered_at": None,
        "soaked_seconds": None,
        "satisfied": True,
    }
    decision.soak = soak
    if previous is None:
        return
    entered = facts.entered.get(previous.name)
    if entered is not None:
        soaked = max(now - entered, timedelta(0))
        soak["entered_at"] = entered.isoformat()
        soak["soaked_seconds"] = int(soaked.total_seconds())
    if not required:
        return
    if entered is None:
        soak["satisfied"] = False
        decision.blockers.append(f"never entered {previous.name}, where it must soak "
                                 f"{_human(required)}")
    elif now - entered < required:
        soak["satisfied"] = False
        left = required - (now - entered)
        soak["remaining_seconds"] = int(left.total_seconds())
        decision.blockers.append(f"soaking in {previous.name}: {_human(left)} left of "
                                 f"{_human(required)}")


def _check_current(target: StreamConfig, facts: DecisionFacts, decision: Decision) -> None:
    current = facts.current.get(target.name)
    if current is None:
        return
    decision.current = {"kernel": current.kernel.release, "since": current.since.isoformat()}
    if target.policy.forbid_older and is_older(facts.kernel, current.kernel):
        decision.current["older"] = True
        decision.blockers.append(f"older than {target.name}'s current kernel "
                                 f"{current.kernel.release}")


def _check_pin(target: StreamConfig, facts: DecisionFacts, decision: Decision) -> None:
    pin = facts.pins.get(target.name)
    if pin is None:
        return
    decision.pin = pin
    if pin["kernel"] != facts.kernel.release:
        decision.blockers.append(f"{target.name} is pinned to {pin['kernel']} by "
                                 f"{pin['author']}: {pin['reason']}")


def promote(session: Session, config: Config, release: str, stream: str, now: datetime, *,
            author: str, force: bool = False, reason: str = "") -> tuple[Promotion, Decision]:
    """Record *release* entering *stream* if the gate allows it.

    ``force`` overrides the policy (results, soak, age), never a pin: a pin is
    a person's explicit hold and is lifted by unpinning.  A forced promotion
    needs a reason and keeps the overridden decision for the audit.
    """
    if force and not reason.strip():
        raise UserError("a forced promotion needs a reason")
    decision = decide(session, config, release, stream, now)
    if decision.pin is not None and decision.pin["kernel"] != release:
        raise UserError(f"{stream} is pinned to {decision.pin['kernel']} on {decision.line}; "
                        "unpin it first")
    if not decision.allowed and not force:
        raise UserError(f"{release} may not enter {stream}: {'; '.join(decision.blockers)}")
    current = current_promotion(session, stream, decision.line)
    if current is not None and current.kernel == release:
        return current, decision  # already there: promoting twice records nothing new
    promotion = Promotion(kernel=release, stream=stream, line=decision.line, at=now,
                          via="decision" if decision.allowed else "force", author=author,
                          reason=reason.strip(), decision=decision.to_json())
    session.add(promotion)
    session.flush()
    return promotion, decision


def pin(session: Session, config: Config, stream: str, release: str, now: datetime, *,
        author: str, reason: str) -> Pin:
    """Hold *stream* on *release* (for its line) until unpinned.

    Pinning to a kernel the stream does not hold makes it the current one
    (recorded as a promotion "via pin"): that is how a stream is rolled back.
    """
    target = config.stream(stream)
    kernel = require_kernel(session, release)
    if not reason.strip():
        raise UserError("a pin needs a reason")
    existing = active_pin(session, target.name, kernel.line)
    if existing is not None:
        if existing.kernel == release:
            return existing
        raise UserError(f"{stream} is already pinned to {existing.kernel} on {kernel.line}; "
                        "unpin it first")
    row = Pin(stream=target.name, line=kernel.line, kernel=release, reason=reason.strip(),
              author=author, created_at=now, removed_at=None, removed_by=None)
    session.add(row)
    current = current_promotion(session, target.name, kernel.line)
    if current is None or current.kernel != release:
        session.add(Promotion(kernel=release, stream=target.name, line=kernel.line, at=now,
                              via="pin", author=author, reason=reason.strip(),
                              decision=decide(session, config, release, stream, now).to_json()))
    session.flush()
    return row


def unpin(session: Session, config: Config, stream: str, now: datetime, *, author: str,
          target: str | None = None) -> Pin:
    """Lift the pin on *stream*; *target* (a kernel or a line) says which if several."""
    config.stream(stream)
    pins = active_pins(session, [stream])
    if target is not None:
        pins = [p for p in pins if target in (p.kernel, p.line)]
    if not pins:
        raise UserError(f"{stream} has no pin" + (f" on {target}" if target else ""))
    if len(pins) > 1:
        lines = ", ".join(p.line for p in pins)
        raise UserError(f"{stream} has pins on several lines ({lines}); name one")
    row = pins[0]
    row.removed_at = now
    row.removed_by = author
    return row


def status(session: Session, config: Config, now: datetime, *,
           facts: FactsReader | None = None,
           candidates_per_line: int = 5) -> list[dict[str, Any]]:
    """Each stream's current kernel per line, its pin, and the newest candidates
    (kernels newer than the current one that reached the previous stream) with
    what blocks them."""
    def gathered(s: Session, release: str, moment: datetime) -> DecisionFacts:
        return gather(s, config, release, moment)

    read_facts = facts or gathered
    lines = kernels_by_line(session)
    history = promotion_history(session)
    pins = {(p.stream, p.line): p for p in sorted(active_pins(session), key=lambda p: p.id)}
    out: list[dict[str, Any]] = []
    for target in config.streams:
        previous = config.previous_stream(target.name)
        stream_lines: list[dict[str, Any]] = []
        for line, kernels in lines.items():
            current = history.current.get((target.name, line))
            pin_row = pins.get((target.name, line))
            newer = kernels
            if current is not None:
                current_kernel = next((k for k in kernels if k.release == current.kernel), None)
                if current_kernel is not None:
                    newer = [k for k in kernels if is_older(current_kernel, k)]
            if previous is not None:
                newer = [k for k in newer if (k.release, previous.name) in history.entered]
            candidates = []
            for k in reversed(newer[-candidates_per_line:]):  # newest first
                d = evaluate(config, read_facts(session, k.release, now), target.name, now)
                candidates.append({"kernel": k.release, "allowed": d.allowed,
                                   "blockers": d.blockers, "waivers": d.waiver_ids})
            stream_lines.append({
                "line": line,
                "current": current.kernel if current else None,
                "since": current.at.isoformat() if current else None,
                "pin": pin_json(pin_row) if pin_row else None,
                "candidates": candidates,
            })
        out.append({"stream": target.name, "previous": previous.name if previous else None,
                    "policy": policy_json(target), "lines": stream_lines})
    return out


def policy_json(target: StreamConfig) -> dict[str, Any]:
    p = target.policy
    return {"kinds": list(p.kinds),
            "modules": list(p.modules) if isinstance(p.modules, tuple) else p.modules,
            "min_soak_seconds": int(p.min_soak.total_seconds()),
            "forbid_older": p.forbid_older}


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "",
             f"{minutes}m" if minutes and not days else ""]
    return "".join(parts) or f"{seconds}s"
