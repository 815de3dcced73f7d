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
kernel, not one per question.  And they come in two parts, kept apart: the
kernel's latest results, and the gate's state (kernels, promotions, pins,
waivers), small tables every kernel's decisions share, read once.  A waiver or
a promotion then renews the state alone, not a hundred kernels' results.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kmodgate.config import Config
from kmodgate.errors import UserError
from kmodgate.gate.streams import active_pins
from kmodgate.gate.waivers import WaiverFact, waivers_not_over
from kmodgate.store.db import Generation, Store, kernel_generation, state_generation
from kmodgate.store.models import Kernel, Pin, Promotion
from kmodgate.store.queries import LatestOutcome, get_kernel, latest_outcomes

Results = dict[tuple[str, str], LatestOutcome]  # (module, kind) -> latest result


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
    results: Results
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


@dataclass(frozen=True)
class GateState:
    """What decisions on every kernel share, read in one go."""

    kernels: dict[str, KernelFacts]
    promotions: dict[str, list[tuple[str, str, datetime]]]  # line -> (kernel, stream, at), in order
    pins: list[dict[str, Any]]  # pin_json of each active pin, oldest first
    waivers: list[WaiverFact]  # not over at gathered_at
    gathered_at: datetime


def read_state(session: Session, now: datetime) -> GateState:
    promotions: dict[str, list[tuple[str, str, datetime]]] = {}
    for line, promoted, stream, at in session.execute(
            select(Promotion.line, Promotion.kernel, Promotion.stream, Promotion.at)
            .order_by(Promotion.at, Promotion.id)):
        promotions.setdefault(line, []).append((promoted, stream, at))
    return GateState(
        kernels={k.release: KernelFacts.of(k) for k in session.scalars(select(Kernel))},
        promotions=promotions,
        pins=[pin_json(p) for p in sorted(active_pins(session), key=lambda p: p.id)],
        waivers=waivers_not_over(session, now),
        gathered_at=now)


def read_results(session: Session, config: Config, release: str) -> Results:
    """The latest result of each module and kind any stream's policy reads."""
    modules = sorted({m for s in config.streams for m in config.policy_modules(s.name)})
    # abi and load results are read with build's: a failed build explains their absence.
    kinds = sorted({"build", *(k for s in config.streams for k in s.policy.kinds)})
    latest = latest_outcomes(session, modules=modules, kernels=[release], kinds=kinds)
    return {(module, kind): outcome for (module, _, kind), outcome in latest.items()}


def assemble(state: GateState, results: Results, release: str) -> DecisionFacts:
    """The facts of one kernel, from the shared state and its results."""
    kernel = state.kernels.get(release)
    if kernel is None:
        raise UserError(f"unknown kernel {release!r}: no results recorded for it yet")
    entered: dict[str, datetime] = {}
    holds: dict[str, tuple[str, datetime]] = {}
    for promoted, stream, at in state.promotions.get(kernel.line, []):
        holds[stream] = (promoted, at)  # later rows win
        if promoted == release:
            entered.setdefault(stream, at)
    return DecisionFacts(
        kernel=kernel,
        results=results,
        waivers=[w for w in state.waivers if fnmatchcase(release, w.kernel_pattern)],
        entered=entered,
        current={stream: CurrentFacts(state.kernels[r], at)
                 for stream, (r, at) in holds.items() if r in state.kernels},
        pins={p["stream"]: p for p in state.pins if p["line"] == kernel.line},
        gathered_at=state.gathered_at)


def gather(session: Session, config: Config, release: str, now: datetime) -> DecisionFacts:
    """Read what deciding on *release*, for any configured stream, needs."""
    require_kernel(session, release)  # before anything else: the first thing to say
    return assemble(read_state(session, now), read_results(session, config, release), release)


@dataclass
class _Entry:
    """A kernel's results, and its facts assembled with the state of the time."""

    generation: Generation  # of the store the results were read from
    results: Results | None = None  # None while being read
    done: threading.Event = field(default_factory=threading.Event)  # reading over
    facts: DecisionFacts | None = None
    state_generation: int = -1  # of the state the facts were assembled with


class DecisionCache:
    """DecisionFacts per kernel, valid while the store's generation holds.

    Shared by the threads of one process (the web server's pool); every process
    has its own, and each sees the others' writes through the generation, which
    lives in the store.  When many requests miss on one kernel at once, one of
    them reads its results and the others wait for it, holding no database
    connection, rather than repeat the work; the state is read once per change
    the same way.  hits and misses count facts; results_reads the reads of a
    kernel's results.
    """

    def __init__(self, config: Config, store: Store, size: int = 1024) -> None:
        self.config = config
        self.store = store
        self.size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._state: tuple[int, GateState] | None = None
        self._state_lock = threading.Lock()  # held while the state is read: one reader
        self.hits = 0
        self.misses = 0
        self.results_reads = 0

    def facts(self, release: str, now: datetime) -> DecisionFacts:
        """The kernel's facts: from the cache if the store has not changed since."""
        def read_state_now(_wanted: int) -> tuple[int, GateState]:
            with self.store.read() as session:
                return self._read_state(session, now)

        def read_results_now() -> tuple[Generation, Results]:
            with self.store.read() as session:
                return self._read_results(session, release)

        return self._get(self.store.kernel_generation(release), release, now,
                         read_state_now, read_results_now)

    def facts_in(self, session: Session, release: str, now: datetime) -> DecisionFacts:
        """The same, read within *session* (as the status of every stream does)."""
        return self._get(kernel_generation(session.connection(), release), release, now,
                         lambda _wanted: self._read_state(session, now),
                         lambda: self._read_results(session, release))

    def warm(self, now: datetime, stop: threading.Event | None = None) -> int:
        """Gather the newest kernels' facts before anyone asks (as many as the
        cache holds), so the first minutes after a start answer as fast as the
        rest; how many were gathered.  Stops early when *stop* is set."""
        with self.store.read() as session:
            newest = list(session.scalars(select(Kernel.release)
                                          .order_by(Kernel.first_seen.desc(), Kernel.id.desc())
                                          .limit(self.size)))
        gathered = 0
        for release in newest:
            if stop is not None and stop.is_set():
                break
            try:
                self.facts(release, now)
            except UserError:  # gone since the listing
                continue
            gathered += 1
        return gathered

    # The generation is read before what it guards, in the same session: where
    # statements see different snapshots (PostgreSQL's read committed), data
    # newer than its key is harmless; older data would be served until the
    # next write.

    def _read_state(self, session: Session, now: datetime) -> tuple[int, GateState]:
        return state_generation(session.connection()), read_state(session, now)

    def _read_results(self, session: Session, release: str) -> tuple[Generation, Results]:
        current = kernel_generation(session.connection(), release)
        require_kernel(session, release)
        self.results_reads += 1
        return current, read_results(session, self.config, release)

    def _state_at(self, wanted: int, now: datetime,
                  read: Callable[[int], tuple[int, GateState]]) -> tuple[int, GateState]:
        with self._state_lock:
            cached = self._state
            if cached is None or cached[0] < wanted or cached[1].gathered_at > now:
                cached = self._state = read(wanted)
            return cached

    def _get(self, current: Generation, release: str, now: datetime,
             read_state_now: Callable[[int], tuple[int, GateState]],
             read_results_now: Callable[[], tuple[Generation, Results]]) -> DecisionFacts:
        """Facts at least as new as generation *current*."""
        with self._lock:
            entry = self._entries.get(release)
            if entry is not None and entry.facts is not None \
                    and entry.generation.covers(current) \
                    and entry.state_generation >= current.state \
                    and entry.facts.gathered_at <= now:
                self._entries.move_to_end(release)
                self.hits += 1
                return entry.facts
            self.misses += 1
            reuse = entry is not None and entry.generation.covers(current._replace(state=0))
            if not reuse:
                entry = _Entry(current)
                self._entries[release] = entry
        assert entry is not None
        if reuse:  # the results still hold (or are being read by another request)
            entry.done.wait(timeout=60)
        else:
            try:
                entry.generation, entry.results = read_results_now()
            except BaseException:
                with self._lock:
                    if self._entries.get(release) is entry:
                        del self._entries[release]
                raise
            finally:
                entry.done.set()
        results = entry.results
        if results is None:  # that reading failed (an unknown kernel, say): see for ourselves
            results = read_results_now()[1]
        state_generation, state = self._state_at(current.state, now, read_state_now)
        facts = assemble(state, results, release)
        with self._lock:
            if state_generation >= entry.state_generation:
                entry.facts, entry.state_generation = facts, state_generation
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return facts
