"""Read-only queries the pages and the API need beyond the gate service:
the matrix, result listings, a kernel's neighbours and failures, events, the
advisor's reports.

Each takes an open session (from Gate.store.transaction()) and returns plain
data.  The matrix reads only the columns it draws: a page of it covers
thousands of cells, and building ORM objects for each would cost more than
the rest of the page.  "Latest" always means kmodgate.store.queries.latest_query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kmodgate.abi.compare import Outcome
from kmodgate.config import Config
from kmodgate.gate.streams import kernels_by_line
from kmodgate.results import KINDS
from kmodgate.store.models import AdviceReport, Event, Kernel, Result
from kmodgate.store.queries import latest_query, latest_results

MATRIX_COLUMNS = (Result.id, Result.module, Result.kernel, Result.kind, Result.outcome)
# A failure or an infrastructure error on a kernel: what the kernel page lists.
NOT_PASSING = (Outcome.FAIL.value, Outcome.ERROR.value)


@dataclass
class MatrixFilter:
    line: str | None = None  # "6.1/amd64"
    flavour: str | None = None  # "amd64": every series of that flavour
    kind: str | None = None  # one check kind, else all
    tag: str | None = None  # modules with this tag in the configuration
    offset: int = 0  # kernels to skip (newest first within each line)
    limit: int = 25  # kernels per page


@dataclass
class Matrix:
    modules: list[str]
    kernels: list[dict[str, str]]  # {"release", "line"}, the page's columns
    kinds: list[str]
    # (module, kernel, kind) -> (result id, outcome) of the latest result
    cells: dict[tuple[str, str, str], tuple[int, str]] = field(default_factory=dict)
    total_kernels: int = 0
    lines: list[str] = field(default_factory=list)  # every line, for the filter form
    flavours: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def module_names(config: Config, tag: str | None = None) -> list[str]:
    return sorted(m.name for m in config.modules.values() if tag is None or tag in m.tags)


def all_tags(config: Config) -> list[str]:
    return sorted({t for m in config.modules.values() for t in m.tags})


def matrix(session: Session, config: Config, f: MatrixFilter) -> Matrix:
    """Tracked modules × a page of kernels, the latest result of each cell per kind."""
    by_line = kernels_by_line(session)
    lines = list(by_line)
    flavours = sorted({line.partition("/")[2] for line in lines})
    columns: list[dict[str, str]] = []
    for line, kernels in by_line.items():
        if f.line and line != f.line:
            continue
        if f.flavour and line.partition("/")[2] != f.flavour:
            continue
        columns.extend({"release": k.release, "line": line} for k in reversed(kernels))
    page = columns[f.offset:f.offset + f.limit]
    kinds = [f.kind] if f.kind else list(KINDS)
    modules = module_names(config, f.tag)
    out = Matrix(modules=modules, kernels=page, kinds=kinds, total_kernels=len(columns),
                 lines=lines, flavours=flavours, tags=all_tags(config))
    if not page or not modules:
        return out
    query, params = latest_query(MATRIX_COLUMNS, kernels=[c["release"] for c in page],
                                 modules=modules, kinds=kinds)
    cells = out.cells
    for rid, module, kernel, kind, outcome in session.execute(query, params):
        cells[(module, kernel, kind)] = (rid, outcome)
    return out


@dataclass
class ResultFilter:
    module: str | None = None
    kernel: str | None = None
    kind: str | None = None
    outcome: str | None = None
    line: str | None = None
    offset: int = 0
    limit: int = 50


def list_results(session: Session, f: ResultFilter) -> tuple[int, list[Result]]:
    """Results matching *f*, newest first, one page of them, and how many match."""
    query = select(Result)
    if f.module:
        query = query.where(Result.module == f.module)
    if f.kernel:
        query = query.where(Result.kernel == f.kernel)
    if f.kind:
        query = query.where(Result.kind == f.kind)
    if f.outcome:
        query = query.where(Result.outcome == f.outcome)
    if f.line:
        query = query.where(Result.kernel.in_(
            select(Kernel.release).where(Kernel.line == f.line).scalar_subquery()))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Result.id.desc()).offset(f.offset).limit(f.limit))
    return int(total), list(rows)


def get_result(session: Session, result_id: int) -> Result | None:
    return session.get(Result, result_id)


def result_json(r: Result) -> dict[str, Any]:
    """A result as the API gives it; the log is named by its URL, not its path."""
    return {
        "id": r.id, "module": r.module, "module_version": r.module_version,
        "kernel": r.kernel, "kind": r.kind, "outcome": r.outcome,
        "reasons": list(r.reasons), "reproducer": r.reproducer, "toolchain": r.toolchain,
        "fingerprint": r.fingerprint, "duration_seconds": r.duration_seconds,
        "details": dict(r.details), "recorded_at": r.recorded_at.isoformat(),
        "log": f"/api/v1/results/{r.id}/log" if r.log_path else None,
    }


def list_kernels(session: Session, line: str | None, offset: int, limit: int
                 ) -> tuple[int, list[Kernel]]:
    """Kernels by line, newest first within each."""
    ordered = [k for ln, ks in kernels_by_line(session).items() if line in (None, ln)
               for k in reversed(ks)]
    return len(ordered), ordered[offset:offset + limit]


def kernel_json(k: Kernel) -> dict[str, Any]:
    return {"release": k.release, "line": k.line, "package_version": k.package_version,
            "source": k.source, "side_band": k.side_band,
            "first_seen": k.first_seen.isoformat()}


def previous_kernel(session: Session, kernel: Kernel) -> Kernel | None:
    """The kernel before *kernel* on its line, in the line's order."""
    kernels = kernels_by_line(session).get(kernel.line, [])
    releases = [k.release for k in kernels]
    i = releases.index(kernel.release) if kernel.release in releases else -1
    return kernels[i - 1] if i > 0 else None


def latest_on_kernel(session: Session, release: str,
                     modules: Sequence[str] | None = None) -> dict[tuple[str, str], Result]:
    """(module, kind) -> the latest result on the kernel."""
    latest = latest_results(session, kernels=[release], modules=modules)
    return {(module, kind): r for (module, _, kind), r in latest.items()}


def list_events(session: Session, kind: str | None, module: str | None, offset: int,
                limit: int) -> tuple[int, list[Event]]:
    query = select(Event)
    if kind:
        query = query.where(Event.kind == kind)
    if module:
        query = query.where(Event.module == module)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Event.id.desc()).offset(offset).limit(limit))
    return int(total), list(rows)


def event_json(e: Event) -> dict[str, Any]:
    return {"id": e.id, "key": e.key, "kind": e.kind, "module": e.module,
            "payload": e.payload, "created_at": e.created_at.isoformat()}


def module_cells(session: Session, module: str) -> list[Result]:
    """The latest result of each (kernel, kind) of *module*: the cells of its row."""
    return list(latest_results(session, modules=[module]).values())


# What a listing of advisor reports shows: not the report, nor its pictures.
ADVICE_SUMMARY = (AdviceReport.id, AdviceReport.recorded_at, AdviceReport.base,
                  AdviceReport.line, AdviceReport.modules)


def list_advice(session: Session, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """The advisor's reports, newest first, without their figures."""
    total = session.scalar(select(func.count()).select_from(AdviceReport)) or 0
    rows = session.execute(select(*ADVICE_SUMMARY).order_by(AdviceReport.id.desc())
                           .offset(offset).limit(limit))
    return int(total), [{"id": r.id, "recorded_at": r.recorded_at.isoformat(), "base": r.base,
                         "line": r.line, "modules": r.modules} for r in rows]


def get_advice(session: Session, report_id: int | None) -> AdviceReport | None:
    """One report, or with no id the newest."""
    if report_id is None:
        return session.scalars(select(AdviceReport).order_by(AdviceReport.id.desc())
                               .limit(1)).first()
    return session.get(AdviceReport, report_id)


def advice_figure(session: Session, report_id: int, column: str) -> str | None:
    """One figure's SVG text, read alone (a report row is much larger)."""
    value = session.scalar(select(getattr(AdviceReport, column))
                           .where(AdviceReport.id == report_id))
    return None if value is None else str(value)


def advice_json(a: AdviceReport) -> dict[str, Any]:
    return {"id": a.id, "recorded_at": a.recorded_at.isoformat(), "base": a.base,
            "line": a.line, "modules": a.modules, "report": a.report,
            "stablelist": a.stablelist}
