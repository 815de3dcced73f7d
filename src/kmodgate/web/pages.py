"""The dashboard: overview, matrix, kernel, module, result and log pages,
waivers, the advisor's report.  Plain HTML with links and forms, no script: every page works with
JavaScript off, and the CSS lays it out for a laptop or a phone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from pydantic import ValidationError

from kmodgate.abi.diff import BREAKING, diff_kernels
from kmodgate.errors import KmodgateError, UserError
from kmodgate.gate.waivers import ANY
from kmodgate.results import KINDS
from kmodgate.web import queries
from kmodgate.web.api import (
    LINE_PATTERN,
    MAX_ID,
    NAME_PATTERN,
    Id,
    WaiverRequest,
    add_waiver,
    advice_or_404,
    kernel_view,
    revoke_waiver,
)
from kmodgate.web.app import WebContext, context
from kmodgate.web.auth import (
    CSRF_COOKIE,
    AuthError,
    authenticate,
    check_form_origin,
    new_csrf_value,
    require_reader,
)
from kmodgate.web.logs import read_log, search_log

router = APIRouter(include_in_schema=False)

PageName = Annotated[str, Query(max_length=200, pattern=NAME_PATTERN)]
OptLine = Annotated[str | None, Query(max_length=200, pattern=LINE_PATTERN)]
OptName = Annotated[str | None, Query(max_length=200, pattern=NAME_PATTERN)]


def reader_ctx(request: Request) -> WebContext:
    ctx = context(request)
    # With reads behind a token, a browser can still send it (Authorization header).
    require_reader(ctx.settings, request)
    return ctx


def render(request: Request, template: str, data: dict[str, Any],
           status: int = 200) -> Response:
    ctx = context(request)
    base = {"nav": template.removesuffix(".html"), "now": ctx.now()}
    response: Response = ctx.templates.TemplateResponse(request, template, {**base, **data},
                                                         status_code=status)
    return response


def _blank(value: str | None) -> str | None:
    # An empty select in a GET form sends "line=": that means "any".
    return value or None


@router.get("/")
def overview(request: Request) -> Response:
    ctx = reader_ctx(request)
    status = ctx.gate.status(now=ctx.now())
    return render(request, "overview.html", {"streams": status})


@router.get("/matrix")
def matrix_page(request: Request,
                line: Annotated[str | None, Query(max_length=200)] = None,
                flavour: Annotated[str | None, Query(max_length=200)] = None,
                kind: Annotated[str | None, Query(max_length=20)] = None,
                tag: Annotated[str | None, Query(max_length=200)] = None,
                offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
                limit: Annotated[int, Query(ge=1, le=200)] = 25) -> Response:
    ctx = reader_ctx(request)
    if kind and kind not in KINDS:
        raise UserError(f"unknown check kind {kind!r} (expected: {', '.join(KINDS)})")
    f = queries.MatrixFilter(line=_blank(line), flavour=_blank(flavour), kind=_blank(kind),
                             tag=_blank(tag), offset=offset, limit=limit)
    with ctx.gate.store.read() as session:
        m = queries.matrix(session, ctx.gate.config, f)
    return render(request, "matrix.html", {"m": m, "f": f, "kinds": KINDS})


@router.get("/kernels")
def kernels_page(request: Request, line: OptLine = None,
                 offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Response:
    ctx = reader_ctx(request)
    with ctx.gate.store.read() as session:
        total, rows = queries.list_kernels(session, _blank(line), offset, 100)
        items = [queries.kernel_json(k) for k in rows]
    return render(request, "kernels.html", {"kernels": items, "total": total,
                                            "offset": offset, "line": line})


@router.get("/kernels/{release}")
def kernel_page(request: Request, release: str,
                abi: Annotated[bool, Query(description="compute the ABI diff")] = False
                ) -> Response:
    ctx = reader_ctx(request)
    view = kernel_view(ctx, release)
    diff = abi_diff(ctx, release, view["previous"]) if abi and view["previous"] else None
    return render(request, "kernel.html", {"k": view, "abi": abi, "diff": diff})


def abi_diff(ctx: WebContext, release: str, previous: str) -> dict[str, Any]:
    """The kernel's ABI diff against *previous*, and what it does to tracked modules.

    Impact is read from the stored abi results: a module that passed on the
    previous kernel and fails here, with the changed symbols its reasons name.
    """
    def compute() -> dict[str, Any]:
        try:
            old = ctx.kernel_loader(previous)
            new = ctx.kernel_loader(release)
        except KmodgateError as exc:
            return {"error": str(exc)}
        d = diff_kernels(old, new)
        return {"counts": d.counts(),
                "breaking": [c.to_json() for c in d.changes.values()
                             if BREAKING.intersection(c.changes)][:500],
                "changed": {s for s, c in d.changes.items()
                            if BREAKING.intersection(c.changes)}}

    data = dict(ctx.cached_abi((previous, release), compute))
    data["previous"] = previous
    if "error" in data:
        return data
    modules = queries.module_names(ctx.gate.config)
    with ctx.gate.store.read() as session:
        before = queries.latest_on_kernel(session, previous, modules)
        after = queries.latest_on_kernel(session, release, modules)
    impact = []
    for module in modules:
        old_r, new_r = before.get((module, "abi")), after.get((module, "abi"))
        symbols = sorted({str(r.get("symbol")) for r in (new_r.reasons if new_r else [])
                          if r.get("symbol") in data["changed"]})
        impact.append({"module": module, "before": old_r.outcome if old_r else None,
                       "after": new_r.outcome if new_r else None,
                       "result": new_r.id if new_r else None, "symbols": symbols})
    data["impact"] = impact
    return data


@router.get("/modules")
def modules_page(request: Request) -> Response:
    ctx = reader_ctx(request)
    return render(request, "modules.html",
                  {"modules": sorted(ctx.gate.config.modules.values(), key=lambda m: m.name)})


@router.get("/modules/{name}")
def module_page(request: Request, name: str) -> Response:
    ctx = reader_ctx(request)
    history = ctx.gate.history(name)
    with ctx.gate.store.read() as session:
        cells = queries.module_cells(session, name)
        by_cell = {(r.kernel, r.kind): {"id": r.id, "outcome": r.outcome,
                                        "has_log": bool(r.log_path)} for r in cells}
    return render(request, "module.html", {"h": history, "cells": by_cell,
                                           "module": ctx.gate.config.modules[name]})


def _result_or_404(ctx: WebContext, result_id: int) -> dict[str, Any]:
    if not 1 <= result_id <= MAX_ID:
        raise UserError(f"unknown result {result_id}")
    with ctx.gate.store.read() as session:
        r = queries.get_result(session, result_id)
        if r is None:
            raise UserError(f"unknown result {result_id}")
        return {**queries.result_json(r), "log_path": r.log_path}


@router.get("/results/{result_id}")
def result_page(request: Request, result_id: int) -> Response:
    ctx = reader_ctx(request)
    r = _result_or_404(ctx, result_id)
    return render(request, "result.html", {"r": r})


@router.get("/results/{result_id}/log")
def log_page(request: Request, result_id: int,
             q: Annotated[str, Query(max_length=200)] = "") -> Response:
    ctx = reader_ctx(request)
    r = _result_or_404(ctx, result_id)
    text = read_log(result_id, r["log_path"])
    lines, matched, truncated = search_log(text, q)
    return render(request, "log.html", {"r": r, "q": q, "lines": lines, "matched": matched,
                                        "truncated": truncated})


@router.get("/advice")
def advice_page(request: Request,
                report: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> Response:
    ctx = reader_ctx(request)
    with ctx.gate.store.read() as session:
        _, reports = queries.list_advice(session, 0, 20)
    if not reports and report is None:
        return render(request, "advice.html", {"a": None, "reports": []})
    a = queries.advice_json(advice_or_404(ctx, report))
    return render(request, "advice.html", {"a": a, "reports": reports})


# The figure columns by name: the request picks a name, never a file.
ADVICE_FIGURES = {"survival": "survival_svg", "churn": "churn_svg"}
# matplotlib's SVG styles its elements inline and needs nothing else; and
# nothing in it may run, should someone open the picture on its own.
FIGURE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


@router.get("/advice/{report_id}/{figure}.svg")
def advice_figure(request: Request, report_id: Id,
                  figure: Annotated[str, FastPath(pattern="^(survival|churn)$")]) -> Response:
    ctx = reader_ctx(request)
    with ctx.gate.store.read() as session:
        svg = queries.advice_figure(session, report_id, ADVICE_FIGURES[figure])
    if svg is None:
        raise UserError(f"unknown advice report {report_id}")
    return Response(svg, media_type="image/svg+xml",
                    headers={"Content-Security-Policy": FIGURE_POLICY})


@router.get("/advice/{report_id}/stablelist")
def advice_stablelist(request: Request, report_id: Id) -> Response:
    ctx = reader_ctx(request)
    a = advice_or_404(ctx, report_id)
    return PlainTextResponse(a.stablelist, headers={
        "Content-Disposition": f'attachment; filename="kmodgate-stablelist-{a.id}"'})


@router.get("/waivers")
def waivers_page(request: Request, all: bool = False) -> Response:
    return _waivers(request, include_inactive=all)


def _waivers(request: Request, *, include_inactive: bool = False, error: str | None = None,
             status: int = 200, form: dict[str, str] | None = None,
             notice: str | None = None) -> Response:
    ctx = reader_ctx(request)
    items = ctx.gate.waivers(include_inactive=include_inactive, now=ctx.now())
    csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_value()
    response = render(request, "waivers.html", {
        "waivers": items, "all": include_inactive, "error": error, "notice": notice,
        "csrf": csrf, "form": form or {}, "kinds": KINDS, "any": ANY,
        "modules": queries.module_names(ctx.gate.config)}, status)
    # Strict: the browser never sends it along with another site's request.
    response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
    return response


@router.post("/waivers")
def waiver_form(request: Request, module: Annotated[str, Form()] = "",
                kernel_pattern: Annotated[str, Form()] = "",
                kind: Annotated[str, Form()] = ANY, reason: Annotated[str, Form()] = "",
                duration: Annotated[str, Form()] = "",
                expires_at: Annotated[str, Form()] = "",
                token: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = ""
                ) -> Response:
    ctx = context(request)
    form = {"module": module, "kernel_pattern": kernel_pattern, "kind": kind,
            "reason": reason, "duration": duration, "expires_at": expires_at}
    try:
        check_form_origin(request, csrf)
        actor = authenticate(ctx.settings, token)
        body = WaiverRequest(module=module, kernel_pattern=kernel_pattern, kind=kind or ANY,
                             reason=reason, duration=duration or None,
                             expires_at=_form_time(expires_at))
        data = add_waiver(ctx, actor, body, request)
    except AuthError as exc:
        return _waivers(request, error=exc.message, status=exc.status, form=form)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                           for e in exc.errors())
        return _waivers(request, error=detail, status=422, form=form)
    except KmodgateError as exc:
        return _waivers(request, error=exc.message, status=422, form=form)
    # Post/redirect/get: reloading the page does not add the waiver twice.
    return RedirectResponse(f"/waivers?added={data['id']}", status_code=303)


def _form_time(value: str) -> datetime | None:
    if not value.strip():
        return None
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"not a time: {value!r} (e.g. 2026-04-01T12:00)") from None


@router.post("/waivers/{waiver_id}/revoke")
def revoke_form(request: Request, waiver_id: int, token: Annotated[str, Form()] = "",
                csrf: Annotated[str, Form()] = "") -> Response:
    ctx = context(request)
    try:
        check_form_origin(request, csrf)
        actor = authenticate(ctx.settings, token)
        if not 1 <= waiver_id <= MAX_ID:
            raise UserError(f"no waiver #{waiver_id}")
        revoke_waiver(ctx, actor, waiver_id, request)
    except AuthError as exc:
        return _waivers(request, error=exc.message, status=exc.status)
    except KmodgateError as exc:
        return _waivers(request, error=exc.message, status=404 if "no waiver" in exc.message
                        else 422)
    return RedirectResponse(f"/waivers?revoked={waiver_id}", status_code=303)
