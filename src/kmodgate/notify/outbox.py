"""The persistent outbox: every queued delivery is sent once, retried with
backoff while the recipient is unreachable, and survives restarts.

A worker *claims* due rows with a compare-and-set UPDATE (only rows nobody
holds a live lease on), commits, sends, then marks each row delivered.  Two
workers therefore never send the same row, on SQLite or PostgreSQL.  The one
gap no outbox closes is a crash between sending and marking: the lease then
expires and the row is sent again.  Senders make that harmless by giving each
delivery a stable identity (the email Message-ID, the webhook's
X-Kmodgate-Delivery header) that receivers deduplicate on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import func, or_, select, update

from kmodgate.notify.events import Message
from kmodgate.store.db import Store
from kmodgate.store.models import Delivery, Event


class DeliveryError(Exception):
    """A send failed.  Permanent: retrying cannot help (the recipient does not exist)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Sender(Protocol):
    def send(self, message: Message) -> None:
        """Deliver or raise DeliveryError."""


@dataclass
class DeliveryReport:
    delivered: int = 0
    retried: int = 0  # failed for now, will be retried
    failed: int = 0  # given up
    errors: list[str] = field(default_factory=list)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Outbox:
    def __init__(self, store: Store, senders: Mapping[str, Sender], *,
                 worker: str | None = None, lease: timedelta = timedelta(minutes=5),
                 max_attempts: int = 12, backoff: timedelta = timedelta(seconds=30),
                 max_backoff: timedelta = timedelta(hours=6)) -> None:
        self.store = store
        self.senders = dict(senders)
        self.worker = worker or default_worker_id()
        self.lease = lease
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff

    def retry_delay(self, attempts: int) -> timedelta:
        """Exponential: 30s, 1m, 2m, ... capped, so a down server is not hammered."""
        delay = self.backoff * (1 << min(max(attempts - 1, 0), 30))
        return min(delay, self.max_backoff)

    def deliver_due(self, now: datetime, *, limit: int = 100) -> DeliveryReport:
        """Send every delivery due at *now* (up to *limit*) that nobody else holds."""
        report = DeliveryReport()
        for message in self._claim(now, limit):
            sender = self.senders.get(message.channel)
            error: DeliveryError | None = None
            if sender is None:
                error = DeliveryError(f"no sender configured for {message.channel}")
            else:
                try:
                    sender.send(message)
                except DeliveryError as exc:
                    error = exc
            self._finish(message, now, error, report)
        return report

    def _claim(self, now: datetime, limit: int) -> list[Message]:
        claimable = (
            Delivery.delivered_at.is_(None),
            Delivery.failed_at.is_(None),
            Delivery.next_attempt_at <= now,
            or_(Delivery.claimed_until.is_(None), Delivery.claimed_until <= now),
        )
        claimed: list[Message] = []
        with self.store.transaction() as session:
            ids = list(session.scalars(
                select(Delivery.id).where(*claimable)
                .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)
                # PostgreSQL: skip rows another worker is claiming right now instead
                # of waiting for it; SQLite has no row locks and ignores this.
                .with_for_update(skip_locked=True)
            ))
            for delivery_id in ids:
                # Compare-and-set: only one worker's UPDATE can match a given row.
                result = session.execute(
                    update(Delivery).where(Delivery.id == delivery_id, *claimable)
                    .values(claimed_by=self.worker, claimed_until=now + self.lease,
                            attempts=Delivery.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if not result.rowcount:  # type: ignore[attr-defined]  # UPDATE -> CursorResult
                    continue
                row = session.execute(
                    select(Delivery, Event).join(Event, Event.id == Delivery.event_id)
                    .where(Delivery.id == delivery_id)
                ).one()
                d, e = row[0], row[1]
                claimed.append(Message(
                    delivery_id=d.id, event_id=e.id, key=e.key, kind=e.kind, module=e.module,
                    payload=dict(e.payload), created_at=e.created_at, channel=d.channel,
                    recipient=d.recipient))
        return claimed

    def _finish(self, message: Message, now: datetime, error: DeliveryError | None,
                report: DeliveryReport) -> None:
        with self.store.transaction() as session:
            d = session.get(Delivery, message.delivery_id, with_for_update=True)
            if d is None or d.claimed_by != self.worker:
                return  # our lease ran out and another worker took over
            d.claimed_by = None
            d.claimed_until = None
            if error is None:
                d.delivered_at = now
                d.last_error = None
                report.delivered += 1
                return
            d.last_error = str(error)
            report.errors.append(f"{message.channel} {message.recipient}: {error}")
            if error.permanent or d.attempts >= self.max_attempts:
                d.failed_at = now
                report.failed += 1
            else:
                d.next_attempt_at = now + self.retry_delay(d.attempts)
                report.retried += 1

    def counts(self) -> dict[str, int]:
        """How many deliveries are pending, delivered and failed."""
        with self.store.transaction() as session:
            delivered = session.scalar(select(func.count()).select_from(Delivery)
                                       .where(Delivery.delivered_at.is_not(None))) or 0
            failed = session.scalar(select(func.count()).select_from(Delivery)
                                    .where(Delivery.failed_at.is_not(None))) or 0
            total = session.scalar(select(func.count()).select_from(Delivery)) or 0
        return {"pending": total - delivered - failed, "delivered": delivered, "failed": failed}

    def next_due(self) -> datetime | None:
        """When the next pending delivery is due: a daemon sleeps until then."""
        with self.store.transaction() as session:
            return session.scalar(
                select(func.min(Delivery.next_attempt_at))
                .where(Delivery.delivered_at.is_(None), Delivery.failed_at.is_(None)))
