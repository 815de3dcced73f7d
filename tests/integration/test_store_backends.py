"""The store on every backend: SQLite (WAL) and a real PostgreSQL server the
fixture starts.  Migrations give exactly the models' schema; concurrent runs
never duplicate a result, an event or a delivery."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kmodgate.errors import UserError
from kmodgate.gate.service import Gate
from kmodgate.gate.waivers import WaiverScope
from kmodgate.notify.events import Message
from kmodgate.notify.outbox import DeliveryError, Outbox
from kmodgate.store.db import make_engine, migrate, open_store, schema_revision
from kmodgate.store.models import (
    Base,
    Delivery,
    Event,
    Kernel,
    Result,
    ResultVersion,
    StoreGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gate_fixtures
from gate_fixtures import CONFIG, DAY, T0, make_config, result

# The shared fixtures: a PostgreSQL server, and a URL per backend.
postgres_server = gate_fixtures.postgres_server
store_url = gate_fixtures.store_url

pytestmark = pytest.mark.integration


def run_together(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run work(0..n-1) in n threads released at the same moment; re-raise failures."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            out[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def count(session: Session, model: type[Base]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_migrated_schema_is_the_models(store_url: str) -> None:
    engine = make_engine(store_url)
    assert schema_revision(engine) is None
    migrate(engine)
    migrate(engine)  # idempotent
    assert schema_revision(engine) == "0004"
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_concurrent_migrations(store_url: str) -> None:
    engines = [make_engine(store_url) for _ in range(3)]
    run_together(3, lambda i: migrate(engines[i]))
    assert schema_revision(engines[0]) == "0004"
    for e in engines:
        e.dispose()


def test_times_come_back_aware_utc(store_url: str, tmp_path: Path) -> None:
    gate = Gate(make_config(tmp_path), open_store(store_url))
    local = T0.astimezone(__import__("datetime").timezone(timedelta(hours=-5)))
    gate.record_kernel("6.1.0-50-amd64", now=local)
    with gate.store.transaction() as s:
        seen = s.scalars(select(Kernel.first_seen)).one()
    assert seen == T0 and seen.utcoffset() == timedelta(0)
    gate.close()


def test_concurrent_runs_store_each_result_once(store_url: str, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    open_store(store_url).dispose()  # migrate once, as the CLI does before work starts
    kernels = [f"6.1.0-{n}-amd64" for n in range(40, 50)]
    batch = [result(m, k, kind) for m in ("zfs", "openrazer-driver") for k in kernels
             for kind in ("abi", "build")]

    def one_run(i: int) -> dict[str, int]:
        gate = Gate(config, open_store(store_url, upgrade=False))
        try:
            # each run records in its own order, in several transactions
            mine = batch[i * 7:] + batch[:i * 7]
            totals = {"new": 0, "unchanged": 0, "replaced": 0}
            for start in range(0, len(mine), 10):
                for key, n in gate.record_results(mine[start:start + 10], now=T0).items():
                    totals[key] += n
            return totals
        finally:
            gate.close()

    runs = run_together(4, one_run)
    assert sum(r["new"] for r in runs) == len(batch)
    assert sum(r["unchanged"] for r in runs) == 3 * len(batch)
    store = open_store(store_url, upgrade=False)
    with store.transaction() as s:
        assert count(s, Result) == len(batch)
        assert count(s, Kernel) == len(kernels)
    gate = Gate(config, store)
    fps = [r.fingerprint for r in batch[:5]] + ["not-checked-yet"]
    assert gate.known_fingerprints("abi", fps) == {r.fingerprint for r in batch[:5]
                                                   if r.kind == "abi"}
    gate.close()


def test_cached_decisions_see_another_process_and_only_its_kernels(store_url: str,
                                                                   tmp_path: Path) -> None:
    """The web server's decision cache, with a sync writing from another process
    (another engine): a write to one kernel is seen at once on that kernel and
    costs no other kernel its cached facts."""
    config = make_config(tmp_path)
    server = Gate(config, open_store(store_url))
    sync = Gate(config, open_store(store_url, upgrade=False))
    k50, k51 = "6.1.0-50-amd64", "6.1.0-51-amd64"
    sync.record_results([result(m, k, kind) for m in config.modules for k in (k50, k51)
                         for kind in ("abi", "build")], now=T0)
    later = T0 + DAY
    assert server.decide(k50, "next", now=later).allowed
    misses = server.decision_cache.misses

    sync.record_results([result("zfs", k51, "build", "fail", version="1.1")], now=later)
    assert server.decide(k50, "next", now=later).allowed
    assert server.decision_cache.misses == misses  # k50's facts still good
    assert not server.decide(k51, "next", now=later).allowed

    sync.record_results([result("zfs", k50, "build", "fail", version="1.1")], now=later)
    assert not server.decide(k50, "next", now=later).allowed
    sync.waive(WaiverScope("zfs", k50, "build"), reason="known", author="a", now=later)
    assert server.decide(k50, "next", now=later).allowed  # a global write: seen too
    server.close()
    sync.close()


def test_concurrent_syncs_count_every_result_transaction(store_url: str,
                                                         tmp_path: Path) -> None:
    """Four syncs recording on the same kernels at once lose no increment and
    deadlock nowhere: each transaction bumps every kernel's result version (an
    upsert), and where it also wrote the kernels table (a sync meeting new
    kernels), the state generation."""
    config = make_config(tmp_path)
    open_store(store_url).dispose()
    kernels = [f"6.1.0-{n}-amd64" for n in range(40, 44)]

    def one_sync(i: int) -> None:
        gate = Gate(config, open_store(store_url, upgrade=False))
        try:
            for v in range(5):
                gate.record_results([result("zfs", k, "abi", version=f"{i}.{v}")
                                     for k in kernels], now=T0)
        finally:
            gate.close()

    run_together(4, one_sync)
    store = open_store(store_url, upgrade=False)
    with store.read() as s:
        versions = dict(s.execute(select(ResultVersion.kernel, ResultVersion.version)).all())
        state, results = s.scalars(select(StoreGeneration.value)
                                   .order_by(StoreGeneration.id)).all()
    assert versions == dict.fromkeys(kernels, 4 * 5)
    assert 1 <= state <= 4 and results == 0
    store.dispose()


def test_concurrent_event_emission_is_once(store_url: str, tmp_path: Path) -> None:
    text = CONFIG + '\n[notify.email]\nhost = "127.0.0.1"\nfrom = "k@example.org"\n'
    config = make_config(tmp_path, text)
    gate = Gate(config, open_store(store_url))
    gate.record_results(
        [result(m, f"6.1.0-{n}-amd64", "build", "pass" if n < 45 else "fail")
         for m in ("zfs", "openrazer-driver") for n in range(40, 50)], now=T0)
    gate.close()

    def emit(_: int) -> int:
        g = Gate(config, open_store(store_url, upgrade=False))
        try:
            return len(g.emit_events(now=T0 + DAY))
        finally:
            g.close()

    emitted = run_together(4, emit)
    assert sum(emitted) == 2  # one regression per module, whoever noticed it
    store = open_store(store_url, upgrade=False)
    with store.transaction() as s:
        assert count(s, Event) == 2
        assert count(s, Delivery) == 2  # each module's one maintainer
    store.dispose()


class SlowLedger:
    """A sender that records what it was asked to send, slowly enough that
    workers overlap: the test is about the outbox's claims, not the wire
    (test_notify covers real SMTP and HTTP)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.fail_first: set[int] = set()

    def send(self, message: Message) -> None:
        threading.Event().wait(0.002)
        with self.lock:
            if message.delivery_id in self.fail_first:
                self.fail_first.discard(message.delivery_id)
                raise DeliveryError("receiver busy")
            self.sent.append((message.delivery_id, message.recipient))


def test_workers_never_send_the_same_delivery(store_url: str, tmp_path: Path) -> None:
    text = CONFIG + "".join(f'\n[modules.mod{m}]\nsource = "src{m}"\n' for m in range(10))
    text += ('\n[notify.email]\nhost = "127.0.0.1"\nfrom = "k@example.org"\n'
             'to = ["a@example.org", "b@example.org", "c@example.org"]\n')
    config = make_config(tmp_path, text)
    gate = Gate(config, open_store(store_url))
    gate.record_results(
        [result(f"mod{m}", f"6.1.0-{n}-amd64", "build", "pass" if n < 45 else "fail")
         for m in range(10) for n in range(40, 50)], now=T0)
    gate.emit_events(now=T0)
    with gate.store.transaction() as s:
        total = count(s, Delivery)
    assert total == 30
    ledger = SlowLedger()
    ledger.fail_first = {3, 7, 11}

    def work(i: int) -> int:
        store = open_store(store_url, upgrade=False)
        try:
            outbox = Outbox(store, {"email": ledger}, worker=f"w{i}")
            delivered = 0
            for _ in range(5):  # several passes, as a daemon would
                delivered += outbox.deliver_due(T0, limit=4).delivered
            return delivered
        finally:
            store.dispose()

    run_together(3, work)
    ids = [d for d, _ in ledger.sent]
    assert len(ids) == len(set(ids))  # never twice
    assert len(ids) == total - 3  # the three that failed wait for their backoff
    after = Outbox(gate.store, {"email": ledger}, worker="w9")
    report = after.deliver_due(T0 + timedelta(minutes=1))
    assert report.delivered == 3
    assert sorted(d for d, _ in ledger.sent) == list(range(1, total + 1))
    assert after.counts() == {"pending": 0, "delivered": total, "failed": 0}
    assert after.deliver_due(T0 + DAY).delivered == 0
    gate.close()


def test_bad_urls_are_user_errors() -> None:
    with pytest.raises(UserError, match="not a database URL"):
        make_engine("kmodgate.db")
    with pytest.raises(UserError, match="unsupported database 'mysql'"):
        make_engine("mysql://localhost/x")
