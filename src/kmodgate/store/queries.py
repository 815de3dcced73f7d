"""The store's reads and writes that more than one part of kmodgate needs.

Writes that may race (two runs recording the same result, two workers noticing
the same event) are INSERT ... ON CONFLICT DO NOTHING against a unique key, so
the database, not a lock in Python, decides who wins.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from sqlalchemy import Select, and_, bindparam, func, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from kmodgate.abi.compare import Outcome
from kmodgate.errors import InfraError
from kmodgate.results import CheckResult
from kmodgate.store.db import RESULT_KERNELS
from kmodgate.store.models import Base, Kernel, Result


class Recorded(StrEnum):
    NEW = "new"  # first result for these inputs
    UNCHANGED = "unchanged"  # the same inputs were already checked: kept the first
    REPLACED = "replaced"  # the stored one was an infrastructure error: replaced


def insert_ignore(session: Session, model: type[Base], values: dict[str, Any],
                  conflict: Sequence[str]) -> bool:
    """Insert a row unless one with the same *conflict* columns exists; True if inserted."""
    dialect = session.get_bind().dialect.name
    key = sa_inspect(model).primary_key[0]
    if dialect == "postgresql":
        pg = postgresql.insert(model).values(**values)
        statement: Any = pg.on_conflict_do_nothing(index_elements=list(conflict))
    elif dialect == "sqlite":
        lite = sqlite.insert(model).values(**values)
        statement = lite.on_conflict_do_nothing(index_elements=list(conflict))
    else:  # make_engine refuses other backends; this guards direct callers
        raise InfraError(f"unsupported database backend {dialect}")
    # RETURNING says whether a row went in; rowcount does not, reliably, through
    # the ORM's insert path on every driver.  Executed on the session's connection
    # (Core), so the ORM adds nothing of its own.
    return session.connection().execute(statement.returning(key)).first() is not None


def result_fingerprint(result: CheckResult) -> str:
    """The result's own fingerprint, or, for an engine that gave none, one from
    what names the cell, so it is still stored once."""
    if result.fingerprint:
        return result.fingerprint
    cell = "\0".join((result.module, result.module_version, result.kernel, result.kind))
    return "cell:" + hashlib.sha256(cell.encode()).hexdigest()


def _result_values(result: CheckResult, now: datetime) -> dict[str, Any]:
    return {
        "fingerprint": result_fingerprint(result),
        "kind": result.kind,
        "module": result.module,
        "module_version": result.module_version,
        "kernel": result.kernel,
        "outcome": Outcome(result.outcome).value,
        "reasons": list(result.reasons),
        "reproducer": result.reproducer,
        "toolchain": result.toolchain,
        "log_path": result.log_path,
        "artifacts": list(result.artifacts),
        "duration_seconds": result.duration_seconds,
        "details": dict(result.details),
        "recorded_at": now,
    }


def record_result(session: Session, result: CheckResult, now: datetime) -> Recorded:
    """Store *result* once per (fingerprint, kind).

    The same inputs give the same outcome, so a repeated or concurrent run's
    copy is dropped; only an ``error`` (our infrastructure failed, the module
    was never judged) is replaced by a later attempt.
    """
    values = _result_values(result, now)
    # Only this kernel's cached decision facts need renewing (see store.db).
    session.info.setdefault(RESULT_KERNELS, set()).add(result.kernel)
    if insert_ignore(session, Result, values, ("fingerprint", "kind")):
        return Recorded.NEW
    stored = session.scalars(
        select(Result).where(Result.fingerprint == values["fingerprint"],
                             Result.kind == result.kind).with_for_update()
    ).one()
    if stored.outcome != Outcome.ERROR.value:
        return Recorded.UNCHANGED
    for name, value in values.items():
        setattr(stored, name, value)
    return Recorded.REPLACED


def known_fingerprints(session: Session, kind: str, fingerprints: Iterable[str]) -> set[str]:
    """Which of *fingerprints* already have a real (non-error) result: skip those."""
    wanted = list(dict.fromkeys(fingerprints))
    found: set[str] = set()
    for start in range(0, len(wanted), 500):  # stay under bind-parameter limits
        chunk = wanted[start:start + 500]
        found.update(session.scalars(
            select(Result.fingerprint).where(
                Result.kind == kind, Result.fingerprint.in_(chunk),
                Result.outcome != Outcome.ERROR.value)
        ))
    return found


def ensure_kernel(session: Session, release: str, line: str, now: datetime, *,
                  package_version: str | None = None, source: str | None = None,
                  side_band: bool = False) -> Kernel:
    """The kernel row for *release*, created on first sight (first_seen = now)."""
    kernel = get_kernel(session, release)
    if kernel is None:  # looked up first: a sync that finds nothing new writes nothing
        insert_ignore(session, Kernel, {
            "release": release, "line": line, "package_version": package_version,
            "source": source, "side_band": side_band, "first_seen": now,
        }, ("release",))
        kernel = session.scalars(select(Kernel).where(Kernel.release == release)).one()
    if package_version and kernel.package_version != package_version:
        kernel.package_version = package_version  # learnt later, e.g. from the archive
    return kernel


def get_kernel(session: Session, release: str) -> Kernel | None:
    return session.scalars(select(Kernel).where(Kernel.release == release)).first()


def latest_query(columns: Sequence[Any], *, modules: Sequence[str] | None = None,
                 kernels: Sequence[str] | None = None,
                 kinds: Sequence[str] | None = None) -> tuple[Select[Any], dict[str, Any]]:
    """*columns* of each (module, kernel, kind) cell's latest result, and the
    parameters to execute that with: the latest is the one recorded last, of
    the highest id if two were recorded at the same time (the query yields both
    then, in id order, so the last one seen wins).

    The database finds each cell's latest time from an index on the cell and
    the time alone, so only those rows travel, not the history.  This is the
    one definition of "latest" that the gate, the matrix and the pages share.
    """
    filters = {name: list(values) for name, values in
               (("modules", modules), ("kernels", kernels), ("kinds", kinds))
               if values is not None}
    return _latest_statement(tuple(columns), frozenset(filters)), filters


@functools.cache
def _latest_statement(columns: tuple[Any, ...], filters: frozenset[str]) -> Select[Any]:
    # Built once per shape, its lists bound at execution: building the statement
    # took longer than running it.
    cell = (Result.module, Result.kernel, Result.kind)
    newest = select(*cell, func.max(Result.recorded_at).label("at")).group_by(*cell)
    for name, column in (("modules", Result.module), ("kernels", Result.kernel),
                         ("kinds", Result.kind)):
        if name in filters:
            newest = newest.where(column.in_(bindparam(name, expanding=True)))
    n = newest.subquery()
    return (select(*columns)
            .join(n, and_(Result.module == n.c.module, Result.kernel == n.c.kernel,
                          Result.kind == n.c.kind, Result.recorded_at == n.c.at))
            .order_by(Result.id))


def latest_results(session: Session, *, modules: Sequence[str] | None = None,
                   kernels: Sequence[str] | None = None,
                   kinds: Sequence[str] | None = None) -> dict[tuple[str, str, str], Result]:
    """(module, kernel, kind) -> the most recently recorded result for that cell.

    A cell has several results when the module or the recipe changed (new
    fingerprint); the latest says how things stand now.
    """
    query, params = latest_query([Result], modules=modules, kernels=kernels, kinds=kinds)
    return {(r.module, r.kernel, r.kind): r for r in session.scalars(query, params)}


class LatestOutcome(NamedTuple):
    outcome: str
    module_version: str
    reasons: list[Any]


LATEST_OUTCOME_COLUMNS = (Result.module, Result.kernel, Result.kind, Result.outcome,
                          Result.module_version, Result.reasons)


def latest_outcomes(session: Session, *, modules: Sequence[str] | None = None,
                    kernels: Sequence[str] | None = None,
                    kinds: Sequence[str] | None = None
                    ) -> dict[tuple[str, str, str], LatestOutcome]:
    """What latest_results says, as plain rows of what a decision reads: a gate
    decision is asked hundreds of times a second, and building ORM objects
    with all their JSON columns would be most of its cost."""
    query, params = latest_query(LATEST_OUTCOME_COLUMNS, modules=modules, kernels=kernels,
                                 kinds=kinds)
    return {(m, k, kind): LatestOutcome(outcome, version, reasons)
            for m, k, kind, outcome, version, reasons
            in session.connection().execute(query, params)}


def result_to_check(r: Result) -> CheckResult:
    return CheckResult(
        module=r.module, module_version=r.module_version, kernel=r.kernel, kind=r.kind,
        outcome=Outcome(r.outcome), reasons=list(r.reasons), fingerprint=r.fingerprint,
        reproducer=r.reproducer, toolchain=r.toolchain, log_path=r.log_path,
        artifacts=list(r.artifacts), duration_seconds=r.duration_seconds,
        details=dict(r.details),
    )
