"""What gate decisions on a kernel read from the store, gathered in one place,
and the cache that lets decisions be asked hundreds of times a second.

A decision is a pure function of these facts, the stream's policy and the
time (kmodgate.gate.policy.evaluate): soak and waiver expiry move with the
clock, the facts do not.  So a kernel's facts can be kept for as long as the
store has not changed, which its generation says in one query
(kmodgate.store.db), and every decision is still computed afresh, at the time
asked: a cached fact never makes a decision stale.

The facts of a kernel serve every stream (the streams read the same results,
the same promotions of its line), so a cold cache costs one gathering per
kernel, not one per question.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kmodgate.config import Config
from kmodgate.errors import UserError
from kmodgate.gate.streams import active_pins
from kmodgate.gate.waivers import WaiverFact, waivers_for_kernel
from kmodgate.store.db import Store, kernel_generation
from kmodgate.store.models import Kernel, Pin, Promotion
from kmodgate.store.queries import LatestOutcome, get_kernel, latest_outcomes


@dataclass(frozen=True)
class KernelFacts:
    """What ordering and lines need of a kernel (a plain value, unlike the row)."""

    release: str
    line: str
    package_version: str | None

    @classmethod
    def of(cls, kernel: Kernel) -> KernelFacts:
        return cls(kernel.release, kernel.line, kernel.package_version)


@dataclass(frozen=True)
class CurrentFacts:
    """The kernel a stream holds on the candidate's line, and since when."""

    kernel: KernelFacts
    since: datetime


@dataclass(frozen=True)
class DecisionFacts:
    """Everything a decision on one kernel, for any stream, reads from the store."""

    kernel: KernelFacts
    results: dict[tuple[str, str], LatestOutcome]  # (module, kind) -> latest result
    waivers: list[WaiverFact]  # covering the kernel, not over at gathered_at
    entered: dict[str, datetime]  # stream -> when the kernel first entered it
    current: dict[str, CurrentFacts]  # stream -> what it holds on the kernel's line
    pins: dict[str, dict[str, Any]]  # stream -> pin_json of its active pin on the line
    # Waivers already over by then were left out, so the facts answer for any
    # time from here on, never for an earlier one.
    gathered_at: datetime


def require_kernel(session: Session, release: str) -> Kernel:
    kernel = get_kernel(session, release)
    if kernel is None:
        raise UserError(f"unknown kernel {release!r}: no results recorded for it yet")
    return kernel


def pin_json(p: Pin) -> dict[str, Any]:
    return {"id": p.id, "stream": p.stream, "line": p.line, "kernel": p.kernel,
            "reason": p.reason, "author": p.author, "since": p.created_at.isoformat()}


def gather(session: Session, config: Config, release: str, now: datetime) -> DecisionFacts:
    """Read what deciding on *release*, for any configured stream, needs."""
    kernel = require_kernel(session, release)
    modules = sorted({m for s in config.streams for m in config.policy_modules(s.name)})
    # abi and load results are read with build's: a failed build explains their absence.
    kinds = sorted({"build", *(k for s in config.streams for k in s.policy.kinds)})
    latest = latest_outcomes(session, modules=modules, kernels=[release], kinds=kinds)
    entered: dict[str, datetime] = {}
    holds: dict[str, tuple[str, datetime]] = {}
    rows = session.execute(select(Promotion.kernel, Promotion.stream, Promotion.at)
                           .where(Promotion.line == kernel.line)
                           .order_by(Promotion.at, Promotion.id))
    for promoted, stream, at in rows:
        holds[stream] = (promoted, at)  # later rows win
        if promoted == release:
            entered.setdefault(stream, at)
    held = {r: KernelFacts.of(k) for r, k in _kernels(session, {r for r, _ in holds.values()})}
    return DecisionFacts(
        kernel=KernelFacts.of(kernel),
        results={(module, kind): outcome for (module, _, kind), outcome in latest.items()},
        waivers=waivers_for_kernel(session, release, now),
        entered=entered,
        current={stream: CurrentFacts(held[r], at) for stream, (r, at) in holds.items()
                 if r in held},
        pins={p.stream: pin_json(p) for p in sorted(active_pins(session), key=lambda p: p.id)
              if p.line == kernel.line},
        gathered_at=now)


def _kernels(session: Session, releases: set[str]) -> list[tuple[str, Kernel]]:
    if not releases:
        return []
    return [(k.release, k) for k in session.scalars(select(Kernel)
                                                    .where(Kernel.release.in_(releases)))]


# (the store's generation, the kernel's result version): store.db.kernel_generation
Generation = tuple[int, int]


def _as_new(seen: Generation, wanted: Generation) -> bool:
    return seen[0] >= wanted[0] and seen[1] >= wanted[1]


@dataclass
class _Entry:
    generation: Generation  # of the store the facts were read from
    facts: DecisionFacts | None = None  # None while being gathered
    done: threading.Event = field(default_factory=threading.Event)  # gathering over


class DecisionCache:
    """DecisionFacts per kernel, valid while the store's generation holds.

    Shared by the threads of one process (the web server's pool); every process
    has its own, and each sees the others' writes through the generation, which
    lives in the store.  When many requests miss on one kernel at once, one of
    them gathers and the others wait for it, holding no database connection,
    rather than repeat the work.
    """

    def __init__(self, config: Config, store: Store, size: int = 1024) -> None:
        self.config = config
        self.store = store
        self.size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def facts(self, release: str, now: datetime) -> DecisionFacts:
        """The kernel's facts: from the cache if the store has not changed since."""
        def read() -> tuple[Generation, DecisionFacts]:
            with self.store.read() as session:
                return self._read(session, release, now)

        return self._get(self.store.kernel_generation(release), release, now, read)

    def facts_in(self, session: Session, release: str, now: datetime) -> DecisionFacts:
        """The same, read within *session* (as the status of every stream does)."""
        return self._get(kernel_generation(session.connection(), release), release, now,
                         lambda: self._read(session, release, now))

    def _read(self, session: Session, release: str, now: datetime
              ) -> tuple[Generation, DecisionFacts]:
        # The generation is read before the facts: where statements see different
        # snapshots (PostgreSQL's read committed), facts newer than their key are
        # harmless; older ones would be served until the next write.
        current = kernel_generation(session.connection(), release)
        return current, gather(session, self.config, release, now)

    def _get(self, current: Generation, release: str, now: datetime,
             read: Callable[[], tuple[Generation, DecisionFacts]]) -> DecisionFacts:
        """Facts at least as new as generation *current*: cached, gathered by a
        request already at it, or read now."""
        with self._lock:
            entry = self._entries.get(release)
            found = self._fresh(entry, current, now)
            if found is not None:
                self._entries.move_to_end(release)
                self.hits += 1
                return found
            in_flight = (entry is not None and entry.facts is None and not entry.done.is_set()
                         and _as_new(entry.generation, current))
            if not in_flight:
                entry = _Entry(current)
                self._entries[release] = entry
                self.misses += 1
        assert entry is not None
        if in_flight:
            entry.done.wait(timeout=60)
            with self._lock:
                found = self._fresh(entry, current, now)
            # None: that gathering failed (an unknown kernel, say): see for ourselves.
            return found if found is not None else read()[1]
        try:
            entry.generation, facts = read()
            entry.facts = facts
        except BaseException:
            with self._lock:
                if self._entries.get(release) is entry:
                    del self._entries[release]
            raise
        finally:
            entry.done.set()
        with self._lock:
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return facts

    @staticmethod
    def _fresh(entry: _Entry | None, current: Generation, now: datetime
               ) -> DecisionFacts | None:
        if entry is None or entry.facts is None or not _as_new(entry.generation, current) \
                or entry.facts.gathered_at > now:
            return None
        return entry.facts
