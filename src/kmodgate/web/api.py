"""REST API, version 1: kernels, modules, results, decisions, streams, waivers,
events, promotions, pins, the advisor's reports, health.

Reads are open unless the settings say ``reads = "token"``; every change needs
a bearer token and is audited, its token's name recorded as the author.
Strings from the client are checked before they reach the store (no NUL, no
lone surrogates, bounded length): the database would otherwise fail on them
with an error that is nobody's fault but the request's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import text

from kmodgate import __version__
from kmodgate.config import parse_duration
from kmodgate.errors import UserError
from kmodgate.gate.waivers import ANY, WaiverScope
from kmodgate.results import KINDS
from kmodgate.store.models import AdviceReport
from kmodgate.web import queries
from kmodgate.web.app import WebContext, context
from kmodgate.web.auth import Actor, authenticate, require_reader
from kmodgate.web.logs import read_log

MAX_ID = 2**62  # beyond any row id; larger numbers would overflow the database's integers
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+~:-]*$"  # kernel releases, modules, streams, lines
LINE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+~:/-]*$"


def clean_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(clean_text)]
bearer = HTTPBearer(auto_error=False, description="A token whose sha256 is configured "
                                                  "under [[web.tokens]].")


# The dependencies are coroutines although they do no I/O: a plain function
# would cost every request a trip through the thread pool.
async def reader(request: Request,
                 _credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(bearer)] = None) -> WebContext:
    ctx = context(request)
    require_reader(ctx.settings, request)
    return ctx


async def writer(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None,
                                        Depends(bearer)] = None) -> Actor:
    return authenticate(context(request).settings,
                        credentials.credentials if credentials else None)


Ctx = Annotated[WebContext, Depends(reader)]
Writer = Annotated[Actor, Depends(writer)]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")]
Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Release = Annotated[str, Path(max_length=200, pattern=NAME_PATTERN,
                              description="Kernel release, e.g. 6.1.0-56-amd64.")]
ModuleName = Annotated[str, Path(max_length=200, pattern=NAME_PATTERN)]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
OptName = Annotated[str | None, Query(max_length=200, pattern=NAME_PATTERN)]
OptLine = Annotated[str | None, Query(max_length=200, pattern=LINE_PATTERN)]
Kind = Annotated[str | None, Query(pattern=f"^({'|'.join(KINDS)})$")]
OutcomeQ = Annotated[str | None, Query(pattern="^(pass|fail|error|skip)$")]

router = APIRouter(prefix="/api/v1", tags=["api"])


def page(total: int, offset: int, limit: int, items: list[Any]) -> dict[str, Any]:
    return {"total": total, "offset": offset, "limit": limit, "items": items}


@router.get("/health", summary="Whether the service and its store answer")
def health(request: Request) -> dict[str, Any]:
    # Open even when reads need a token: monitors should not hold one.
    ctx = context(request)
    with ctx.gate.store.read() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__, "store": ctx.gate.store.backend}


@router.get("/kernels", summary="Kernels, newest first within each line")
def kernels(ctx: Ctx, line: OptLine = None, offset: Offset = 0,
            limit: Limit = 50) -> dict[str, Any]:
    with ctx.gate.store.read() as session:
        total, rows = queries.list_kernels(session, line, offset, limit)
        return page(total, offset, limit, [queries.kernel_json(k) for k in rows])


@router.get("/kernels/{release}", summary="A kernel: its decision for every stream, "
                                          "what fails on it")
def kernel(ctx: Ctx, release: Release) -> dict[str, Any]:
    return kernel_view(ctx, release)


def kernel_view(ctx: WebContext, release: str) -> dict[str, Any]:
    """What the kernel page and the API show of one kernel."""
    from kmodgate.gate.facts import require_kernel

    now = ctx.now()
    with ctx.gate.store.read() as session:
        k = require_kernel(session, release)
        previous = queries.previous_kernel(session, k)
        latest = queries.latest_on_kernel(session, release)
        failing = [queries.result_json(r) for (_, _), r in sorted(latest.items())
                   if r.outcome in queries.NOT_PASSING]
        info = queries.kernel_json(k)
    decisions = [ctx.gate.decide(release, s.name, now=now).to_json()
                 for s in ctx.gate.config.streams]
    return {**info, "previous": previous.release if previous else None,
            "decisions": decisions, "failing": failing,
            "counts": _count_outcomes(latest.values())}


def _count_outcomes(results: Any) -> dict[str, int]:
    counts = {"pass": 0, "fail": 0, "error": 0, "skip": 0}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return counts


@router.get("/modules", summary="Tracked modules, as configured")
def modules(ctx: Ctx) -> dict[str, Any]:
    items = [{"name": m.name, "source": m.source, "required": m.required,
              "tags": list(m.tags), "maintainers": list(m.maintainers)}
             for m in sorted(ctx.gate.config.modules.values(), key=lambda m: m.name)]
    return page(len(items), 0, len(items), items)


@router.get("/modules/{name}", summary="A module's history along each kernel line")
def module(ctx: Ctx, name: ModuleName) -> dict[str, Any]:
    return ctx.gate.history(name)


@router.get("/results", summary="Check results, newest first, filtered and paginated")
def results(ctx: Ctx, module: OptName = None, kernel: OptName = None, kind: Kind = None,
            outcome: OutcomeQ = None, line: OptLine = None, offset: Offset = 0,
            limit: Limit = 50) -> dict[str, Any]:
    f = queries.ResultFilter(module=module, kernel=kernel, kind=kind, outcome=outcome,
                             line=line, offset=offset, limit=limit)
    with ctx.gate.store.read() as session:
        total, rows = queries.list_results(session, f)
        return page(total, offset, limit, [queries.result_json(r) for r in rows])


@router.get("/results/{result_id}", summary="One check result with its reasons and reproducer")
def result(ctx: Ctx, result_id: Id) -> dict[str, Any]:
    with ctx.gate.store.read() as session:
        r = queries.get_result(session, result_id)
        if r is None:
            raise UserError(f"unknown result {result_id}") from None
        return queries.result_json(r)


@router.get("/results/{result_id}/log", summary="The full log of a check, as plain text",
            response_class=PlainTextResponse)
def result_log(ctx: Ctx, result_id: Id) -> PlainTextResponse:
    # The file is the one the store names for this result: never a path from the request.
    with ctx.gate.store.read() as session:
        r = queries.get_result(session, result_id)
        if r is None:
            raise UserError(f"unknown result {result_id}")
        log_path = r.log_path
    return PlainTextResponse(read_log(result_id, log_path),
                             headers={"Content-Disposition": "inline"})


class DecisionRequest(BaseModel):
    kernel: Text = Field(max_length=200, description="Kernel release, e.g. 6.1.0-56-amd64.")
    stream: Text = Field(max_length=100, description="A configured stream, e.g. testing.")


class DecisionCell(BaseModel):
    module: str
    kind: str
    outcome: str = Field(description="pass, fail, error, skip, or missing (no result).")
    module_version: str | None = None
    reasons: list[dict[str, Any]] | None = None
    waiver: dict[str, Any] | None = Field(default=None, description="The waiver used.")


class DecisionSoak(BaseModel):
    previous_stream: str | None
    required_seconds: int
    entered_at: str | None
    soaked_seconds: int | None
    satisfied: bool
    remaining_seconds: int | None = None


class DecisionAnswer(BaseModel):
    """What POST /api/v1/decision answers (kmodgate.gate.policy.Decision.to_json)."""

    kernel: str
    stream: str
    line: str
    allowed: bool
    satisfied: list[DecisionCell]
    unsatisfied: list[DecisionCell]
    waived: list[DecisionCell]
    waivers: list[int] = Field(description="Ids of the waivers used.")
    soak: DecisionSoak
    pin: dict[str, Any] | None
    current: dict[str, Any] | None
    blockers: list[str] = Field(description="What blocks, one line each; empty if allowed.")


@router.post("/decision", response_model=DecisionAnswer,
             summary="May this kernel enter this stream now? (Greenwave-style)")
def decision(ctx: Ctx, body: DecisionRequest) -> JSONResponse:
    # Answered as JSON directly: FastAPI's generic encoding of the model would
    # cost twice the decision itself, and this endpoint is asked the most.
    # The schema above still documents it, and the schemathesis run checks
    # the answers against it.
    return JSONResponse(ctx.gate.decide(body.kernel, body.stream, now=ctx.now()).to_json())


@router.get("/streams", summary="Each stream: current kernel per line, candidates, pins")
def streams(ctx: Ctx) -> list[dict[str, Any]]:
    return ctx.gate.status(now=ctx.now())


@router.get("/waivers", summary="Waivers (active ones unless asked for all)")
def waivers(ctx: Ctx, include_inactive: bool = False) -> dict[str, Any]:
    items = ctx.gate.waivers(include_inactive=include_inactive, now=ctx.now())
    return page(len(items), 0, len(items), items)


class WaiverRequest(BaseModel):
    module: Text = Field(min_length=1, max_length=200, description="A module name or a glob.")
    kernel_pattern: Text = Field(min_length=1, max_length=200,
                                 description="A glob over kernel releases.")
    kind: Text = Field(default=ANY, max_length=20, description="A check kind, or *.")
    reason: Text = Field(min_length=1, max_length=2000)
    expires_at: datetime | None = Field(default=None, description="When it stops applying.")
    duration: Text | None = Field(default=None, max_length=40,
                                  description='Or how long it applies: "3d", "12h".')


def add_waiver(ctx: WebContext, actor: Actor, body: WaiverRequest,
               request: Request | None) -> dict[str, Any]:
    """Shared by the API and the waivers form."""
    now = ctx.now()
    duration: timedelta | None = None
    if body.duration:
        duration = parse_duration(body.duration)
        if duration is None:
            raise UserError(f"not a duration: {body.duration!r} (e.g. \"3d\", \"12h\")")
    expires = body.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)  # a time without a zone is taken as UTC
    if duration is not None:
        if expires is not None:
            raise UserError("give a waiver an expiry time or a duration, not both")
        try:
            expires = now + duration
        except OverflowError:
            raise UserError("the waiver's expiry is beyond any representable time") from None
    data = ctx.gate.waive(WaiverScope(body.module, body.kernel_pattern, body.kind),
                          reason=body.reason, author=actor.name, expires_at=expires, now=now)
    ctx.auditor.record(actor, "waiver.add", data, now, request)
    return data


@router.post("/waivers", status_code=201, summary="Add a waiver (needs a token)")
def waiver_add(ctx: Ctx, actor: Writer, body: WaiverRequest, request: Request
               ) -> dict[str, Any]:
    return add_waiver(ctx, actor, body, request)


def revoke_waiver(ctx: WebContext, actor: Actor, waiver_id: int,
                  request: Request | None) -> dict[str, Any]:
    now = ctx.now()
    data = ctx.gate.revoke_waiver(waiver_id, now=now)
    ctx.auditor.record(actor, "waiver.revoke", data, now, request)
    return data


@router.post("/waivers/{waiver_id}/revoke", summary="Revoke a waiver (needs a token)")
def waiver_revoke(ctx: Ctx, actor: Writer, waiver_id: Id, request: Request
                  ) -> dict[str, Any]:
    return revoke_waiver(ctx, actor, waiver_id, request)


@router.get("/events", summary="Regressions, fixes and decision changes, newest first")
def events(ctx: Ctx, kind: Annotated[str | None, Query(pattern="^(regression|fix|decision)$")]
           = None, module: OptName = None, offset: Offset = 0,
           limit: Limit = 50) -> dict[str, Any]:
    with ctx.gate.store.read() as session:
        total, rows = queries.list_events(session, kind, module, offset, limit)
        return page(total, offset, limit, [queries.event_json(e) for e in rows])


@router.get("/advice", summary="The advisor's recorded reports, newest first")
def advice_reports(ctx: Ctx, offset: Offset = 0, limit: Limit = 50) -> dict[str, Any]:
    with ctx.gate.store.read() as session:
        total, items = queries.list_advice(session, offset, limit)
        return page(total, offset, limit, items)


@router.get("/advice/{report_id}", summary="One advisor report: survival, churn, symbol "
                                           "usage and the proposed stablelist")
def advice_report(ctx: Ctx, report_id: Id) -> dict[str, Any]:
    return queries.advice_json(advice_or_404(ctx, report_id))


def advice_or_404(ctx: WebContext, report_id: int | None) -> AdviceReport:
    with ctx.gate.store.read() as session:
        report = queries.get_advice(session, report_id)
    if report is None:
        raise UserError(f"unknown advice report {report_id}" if report_id is not None
                        else "unknown advice report: none recorded yet")
    return report


class PromotionRequest(BaseModel):
    kernel: Text = Field(max_length=200)
    stream: Text = Field(max_length=100)
    force: bool = Field(default=False, description="Override the policy (never a pin); "
                                                   "needs a reason.")
    reason: Text = Field(default="", max_length=2000)


@router.post("/promotions", status_code=201, summary="Promote a kernel into a stream "
                                                      "(needs a token)")
def promotion(ctx: Ctx, actor: Writer, body: PromotionRequest, request: Request
              ) -> dict[str, Any]:
    now = ctx.now()
    data = ctx.gate.promote(body.kernel, body.stream, author=actor.name, force=body.force,
                            reason=body.reason, now=now)
    ctx.auditor.record(actor, "promote", {k: v for k, v in data.items() if k != "decision"},
                       now, request)
    return data


class PinRequest(BaseModel):
    stream: Text = Field(max_length=100)
    kernel: Text = Field(max_length=200)
    reason: Text = Field(min_length=1, max_length=2000)


@router.post("/pins", status_code=201, summary="Hold a stream on a kernel (needs a token)")
def pin(ctx: Ctx, actor: Writer, body: PinRequest, request: Request) -> dict[str, Any]:
    now = ctx.now()
    data = ctx.gate.pin(body.stream, body.kernel, author=actor.name, reason=body.reason,
                        now=now)
    ctx.auditor.record(actor, "pin", data, now, request)
    return data


@router.delete("/pins/{stream}", summary="Lift a stream's pin (needs a token)")
def unpin(ctx: Ctx, actor: Writer, request: Request,
          stream: Annotated[str, Path(max_length=100, pattern=NAME_PATTERN)],
          target: OptLine = None) -> dict[str, Any]:
    now = ctx.now()
    data = ctx.gate.unpin(stream, author=actor.name, target=target, now=now)
    ctx.auditor.record(actor, "unpin", data, now, request)
    return data
