"""The tables kmodgate keeps: kernels, check results, promotions, pins,
waivers, gate decisions, notification events and their outbox, the store's
generation, and the advisor's reports.

Every change to these classes needs a migration in ``migrations/versions``;
a test compares the migrated schema with these models on every backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out.

    SQLite keeps no time zone, so times are stored as naive UTC everywhere and
    the zone is put back on the way out; comparisons in SQL then agree on
    both backends.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()
    }


class Kernel(Base):
    """A kernel build kmodgate knows of; its release names it everywhere."""

    __tablename__ = "kernels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release: Mapped[str] = mapped_column(String(200), unique=True)
    line: Mapped[str] = mapped_column(String(200), index=True)  # series/flavour: "6.1/amd64"
    package_version: Mapped[str | None] = mapped_column(String(200))  # orders a line
    source: Mapped[str | None] = mapped_column(String(200))
    side_band: Mapped[bool] = mapped_column(Boolean, default=False)
    first_seen: Mapped[datetime]


class Result(Base):
    """One CheckResult.  (fingerprint, kind) is unique: the same inputs are never
    checked, nor stored, twice.  Old fingerprints stay: that is the history."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("fingerprint", "kind", name="uq_results_fingerprint_kind"),
        # Each cell's latest time (store.queries.latest_query) from the index
        # alone, by module (a module's row) or by kernel (a decision, the matrix).
        Index("ix_results_cell_time", "module", "kernel", "kind", "recorded_at"),
        Index("ix_results_kernel_cell_time", "kernel", "module", "kind", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    module: Mapped[str] = mapped_column(String(200))
    module_version: Mapped[str] = mapped_column(String(200))
    kernel: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(10))
    reasons: Mapped[list[Any]]
    reproducer: Mapped[str] = mapped_column(Text, default="")
    toolchain: Mapped[str | None] = mapped_column(String(200))
    log_path: Mapped[str | None] = mapped_column(Text)
    artifacts: Mapped[list[Any]]
    duration_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    details: Mapped[dict[str, Any]]
    recorded_at: Mapped[datetime]


class Promotion(Base):
    """A kernel entering a stream: the audit trail, forced ones with their reason."""

    __tablename__ = "promotions"
    __table_args__ = (Index("ix_promotions_stream_line", "stream", "line"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kernel: Mapped[str] = mapped_column(String(200), index=True)
    stream: Mapped[str] = mapped_column(String(100))
    line: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime]
    via: Mapped[str] = mapped_column(String(20))  # "decision", "force" or "pin"
    author: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    decision: Mapped[dict[str, Any]]  # the decision as it stood, for the audit


class Pin(Base):
    """Holds a stream's line on one kernel until unpinned."""

    __tablename__ = "pins"
    __table_args__ = (Index("ix_pins_stream_line", "stream", "line"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stream: Mapped[str] = mapped_column(String(100))
    line: Mapped[str] = mapped_column(String(200))
    kernel: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]
    removed_by: Mapped[str | None] = mapped_column(String(200))


class Waiver(Base):
    """Lets a failing (or missing) result not block, within a scope, until it expires."""

    __tablename__ = "waivers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    module: Mapped[str] = mapped_column(String(200))  # a name or a glob
    kernel_pattern: Mapped[str] = mapped_column(String(200))  # a glob over releases
    kind: Mapped[str] = mapped_column(String(20))  # a kind or "*"
    reason: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class DecisionState(Base):
    """The last computed decision per (kernel, stream), to notice when it changes."""

    __tablename__ = "decision_states"
    __table_args__ = (
        UniqueConstraint("kernel", "stream", name="uq_decision_states_kernel_stream"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kernel: Mapped[str] = mapped_column(String(200))
    stream: Mapped[str] = mapped_column(String(100))
    allowed: Mapped[bool] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)  # bumped on every change
    updated_at: Mapped[datetime]


class Event(Base):
    """Something worth telling people about.  The natural key is unique, so
    noticing the same regression again inserts nothing and sends nothing."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(700), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # "regression", "fix", "decision"
    module: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Delivery(Base):
    """The outbox: one row per (event, channel, recipient), delivered at most
    once by whichever worker claims it, retried with backoff until then."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "channel", "recipient",
                         name="uq_deliveries_event_id_channel_recipient"),
        Index("ix_deliveries_due", "delivered_at", "failed_at", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(20))  # "email" or "webhook"
    recipient: Mapped[str] = mapped_column(String(700))  # an address or a URL
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_until: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]  # gave up: permanent error or too many attempts
    last_error: Mapped[str | None] = mapped_column(Text)


class StoreGeneration(Base):
    """Counters of the store's committed write transactions: row 1 those that
    wrote the gate's state (anything but results), row 2 those that wrote
    results without naming their kernels (ResultVersion counts the others).

    So "has anything a decision on this kernel reads changed?" is one read of
    three numbers: what the gate's decision cache keys on, on every backend and
    across processes.  kmodgate.store.db.Store.transaction bumps them.
    """

    __tablename__ = "store_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class ResultVersion(Base):
    """How many transactions recorded results for a kernel: a sync writes
    results all the time, and it should not make every kernel's cached
    decision facts stale, only those of the kernels it checked."""

    __tablename__ = "result_versions"

    kernel: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


class AdviceReport(Base):
    """One run of the advisor (`kmodgate advise --record`), kept for the
    dashboard: its figures as the command's JSON, the stablelist it proposes
    and its plots as SVG text, so the web serves them from the store alone."""

    __tablename__ = "advice_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recorded_at: Mapped[datetime]
    base: Mapped[str] = mapped_column(String(200))  # the kernel the corpus was built for
    line: Mapped[str] = mapped_column(String(200))
    modules: Mapped[int] = mapped_column(Integer)  # the corpus's size
    report: Mapped[dict[str, Any]]
    stablelist: Mapped[str] = mapped_column(Text)  # kabi_stablelist format
    survival_svg: Mapped[str] = mapped_column(Text)
    churn_svg: Mapped[str] = mapped_column(Text)
