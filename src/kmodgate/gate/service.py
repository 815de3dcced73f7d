"""The gate as the CLI and the web front end use it: one object over a
configuration and a store, each call one short transaction.

Every call takes ``now`` (default: the current UTC time) so soak and expiry
are testable without sleeping, and raises UserError / InfraError with a
one-line message; nothing here prints or exits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from kmodgate.config import Config, SourceConfig
from kmodgate.errors import UserError
from kmodgate.gate import policy, regressions, waivers
from kmodgate.gate.facts import DecisionCache
from kmodgate.lines import kernel_line
from kmodgate.notify import events as notify_events
from kmodgate.notify.email import EmailSender
from kmodgate.notify.outbox import DeliveryReport, Outbox, Sender
from kmodgate.notify.webhook import WebhookSender
from kmodgate.results import KINDS, CheckResult
from kmodgate.store.db import Store, open_store
from kmodgate.store.queries import (
    Recorded,
    ensure_kernel,
    get_kernel,
    known_fingerprints,
    record_result,
    result_fingerprint,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Gate:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.decision_cache = DecisionCache(config, store)

    @classmethod
    def open(cls, config: Config, url: str | None = None) -> Gate:
        """The gate over the configured store (or *url*), its schema brought up to date."""
        return cls(config, open_store(url or config.store_url))

    def close(self) -> None:
        self.store.dispose()

    # Sync hooks: what the runner calls as kernels appear and checks finish.

    def record_kernel(self, release: str, *, source: SourceConfig | None = None,
                      package_version: str | None = None, now: datetime | None = None) -> str:
        """Remember a kernel build (first_seen = now on first sight); its line."""
        line = source.line if source is not None and source.line else kernel_line(release)
        with self.store.transaction() as session:
            kernel = ensure_kernel(session, release, line, now or utcnow(),
                                   package_version=package_version,
                                   source=source.name if source else None,
                                   side_band=bool(source and source.side_band))
            return kernel.line

    def known_fingerprints(self, kind: str, fingerprints: Iterable[str]) -> set[str]:
        """The fingerprints already checked: the runner skips these cells."""
        with self.store.transaction() as session:
            return known_fingerprints(session, kind, fingerprints)

    def record_results(self, results: Iterable[CheckResult], *,
                       now: datetime | None = None) -> dict[str, int]:
        """Store results (each once per fingerprint and kind); counts by new/unchanged/replaced.

        An unknown kernel is remembered on the way, its line derived from the release.
        """
        moment = now or utcnow()
        counts: Counter[str] = Counter({r.value: 0 for r in Recorded})
        # Concurrent runs insert in one global order (kernels, then results, each
        # sorted by key) so their row locks can never wait on each other in a
        # cycle: PostgreSQL would abort one run with "deadlock detected".
        batch = sorted(results, key=lambda r: (result_fingerprint(r), r.kind))
        for result in batch:
            if result.kind not in KINDS:
                raise UserError(f"unknown check kind {result.kind!r}")
        with self.store.transaction() as session:
            for release in sorted({r.kernel for r in batch}):
                if get_kernel(session, release) is None:
                    ensure_kernel(session, release, kernel_line(release), moment)
            for result in batch:
                counts[record_result(session, result, moment).value] += 1
        return dict(counts)

    def emit_events(self, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Notice new regressions, fixes and decision changes; queue their deliveries."""
        with self.store.transaction() as session:
            found = notify_events.emit_events(session, self.config, now or utcnow())
            return [{"id": e.id, "key": e.key, "kind": e.kind, "module": e.module}
                    for e in found]

    def outbox(self, *, worker: str | None = None) -> Outbox:
        senders: dict[str, Sender] = {}
        if self.config.notify.email is not None:
            senders[notify_events.EMAIL] = EmailSender(self.config.notify.email)
        if self.config.notify.webhooks:
            senders[notify_events.WEBHOOK] = WebhookSender(self.config.notify.webhooks)
        return Outbox(self.store, senders, worker=worker)

    def deliver(self, *, now: datetime | None = None) -> DeliveryReport:
        """Send what is due; what fails stays queued with its next attempt time."""
        return self.outbox().deliver_due(now or utcnow())

    # Gate commands.

    def decide(self, kernel: str, stream: str, *,
               now: datetime | None = None) -> policy.Decision:
        moment = now or utcnow()
        self.config.stream(stream)  # an unknown stream is the first thing to say
        return policy.evaluate(self.config, self.decision_cache.facts(kernel, moment), stream,
                               moment)

    def promote(self, kernel: str, stream: str, *, author: str, force: bool = False,
                reason: str = "", now: datetime | None = None) -> dict[str, Any]:
        with self.store.transaction() as session:
            promotion, decision = policy.promote(session, self.config, kernel, stream,
                                                 now or utcnow(), author=author, force=force,
                                                 reason=reason)
            return {"id": promotion.id, "kernel": promotion.kernel, "stream": promotion.stream,
                    "line": promotion.line, "at": promotion.at.isoformat(),
                    "via": promotion.via, "author": promotion.author,
                    "reason": promotion.reason, "decision": decision.to_json()}

    def pin(self, stream: str, kernel: str, *, author: str, reason: str,
            now: datetime | None = None) -> dict[str, Any]:
        with self.store.transaction() as session:
            return policy.pin_json(policy.pin(session, self.config, stream, kernel,
                                              now or utcnow(), author=author, reason=reason))

    def unpin(self, stream: str, *, author: str, target: str | None = None,
              now: datetime | None = None) -> dict[str, Any]:
        with self.store.transaction() as session:
            return policy.pin_json(policy.unpin(session, self.config, stream, now or utcnow(),
                                                author=author, target=target))

    def status(self, *, now: datetime | None = None) -> list[dict[str, Any]]:
        with self.store.read() as session:
            return policy.status(session, self.config, now or utcnow(),
                                 facts=self.decision_cache.facts_in)

    def waive(self, scope: waivers.WaiverScope, *, reason: str, author: str,
              expires_at: datetime | None = None, duration: timedelta | None = None,
              now: datetime | None = None) -> dict[str, Any]:
        if scope.module not in self.config.modules and not any(c in scope.module for c in "*?["):
            raise UserError(f"unknown module {scope.module!r} (not in the configuration)")
        with self.store.transaction() as session:
            return waivers.waiver_json(waivers.add_waiver(
                session, scope, reason=reason, author=author, now=now or utcnow(),
                expires_at=expires_at, duration=duration))

    def revoke_waiver(self, waiver_id: int, *, now: datetime | None = None) -> dict[str, Any]:
        with self.store.transaction() as session:
            return waivers.waiver_json(waivers.revoke_waiver(session, waiver_id,
                                                             now or utcnow()))

    def waivers(self, *, include_inactive: bool = False,
                now: datetime | None = None) -> list[dict[str, Any]]:
        moment = now or utcnow()
        with self.store.read() as session:
            rows = (waivers.all_waivers(session) if include_inactive
                    else waivers.active_waivers(session, moment))
            return [waivers.waiver_json(w, moment) for w in rows]

    def history(self, module: str) -> dict[str, Any]:
        if module not in self.config.modules:
            raise UserError(f"unknown module {module!r} (not in the configuration)")
        with self.store.read() as session:
            return regressions.module_history(session, module)
