"""The web application: dashboard pages and the REST API over one Gate.

``create_app`` takes a Gate (or a Config, from which it opens one) and the
web settings, and returns a FastAPI application; ``kmodgate serve`` runs it
under uvicorn.  Handlers are plain functions (FastAPI runs them in its thread
pool) because the store is synchronous SQLAlchemy.

Errors never reach a client as a traceback: the API answers RFC 9457 problem
documents (application/problem+json) with the status the error deserves, the
pages an HTML page with the same status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kmodgate import __version__
from kmodgate.abi.model import KernelABI
from kmodgate.config import Config
from kmodgate.errors import InfraError, KmodgateError, UserError
from kmodgate.gate.service import Gate
from kmodgate.web.auth import Auditor, AuthError
from kmodgate.web.settings import WebSettings

log = logging.getLogger("kmodgate.web")

HERE = Path(__file__).resolve().parent
PROBLEM = "application/problem+json"
API_PREFIX = "/api/"

KernelLoader = Callable[[str], KernelABI]


def debian_kernel(release: str) -> KernelABI:
    """The kernel's exports from the Debian archive (headers fetched through apt)."""
    from kmodgate.sources.kernels import load_kernel

    return load_kernel(f"debian:{release}")


@dataclass
class WebContext:
    """What every handler needs, kept on app.state."""

    gate: Gate
    settings: WebSettings
    auditor: Auditor
    templates: Jinja2Templates
    clock: Callable[[], datetime]
    kernel_loader: KernelLoader
    # ABI diffs are slow to compute (headers fetched, exports parsed): keep them.
    _abi_cache: dict[tuple[str, str], Any] = field(default_factory=dict)
    _abi_lock: threading.Lock = field(default_factory=threading.Lock)
    # The decision cache's warm-up at start (see _lifespan).
    warming: threading.Thread | None = None
    stop_warming: threading.Event = field(default_factory=threading.Event)

    def now(self) -> datetime:
        return self.clock()

    def cached_abi(self, key: tuple[str, str], compute: Callable[[], Any]) -> Any:
        with self._abi_lock:
            if key in self._abi_cache:
                return self._abi_cache[key]
        value = compute()
        with self._abi_lock:
            if len(self._abi_cache) > 64:
                self._abi_cache.clear()
            self._abi_cache[key] = value
        return value


# Threads for the handlers that read the store (FastAPI runs plain functions in
# a pool).  Their work is Python holding the GIL, so more threads only take
# turns: with anyio's default of 40, a burst of cold decisions took twice as
# long to clear as with 4 (benchmarks/web_load.py).
WORKER_THREADS = 8


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    ctx = app.state.kmodgate
    # Right after a start every decision would read its kernel's facts, all at
    # once under load: read them in the background instead, newest kernels
    # first, while the first requests come in (benchmarks/web_load.py).
    ctx.warming = threading.Thread(target=_warm_decisions, args=(ctx,), daemon=True,
                                   name="kmodgate-warm-decisions")
    ctx.warming.start()
    try:
        yield
    finally:
        ctx.stop_warming.set()
        ctx.warming.join(timeout=10)


def _warm_decisions(ctx: WebContext) -> None:
    try:
        ctx.gate.decision_cache.warm(ctx.now(), ctx.stop_warming)
    except Exception as exc:  # only an optimisation: the requests gather for themselves
        log.warning("decision cache warm-up stopped: %s: %s", type(exc).__name__, exc)


def context(request: Request) -> WebContext:
    ctx = request.app.state.kmodgate
    assert isinstance(ctx, WebContext)
    return ctx


def make_templates() -> Jinja2Templates:
    # Autoescape everything: module names, reasons and logs come from modules
    # and their build output, which anyone can make say "<script>".
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    return Jinja2Templates(env=env)


def create_app(gate_or_config: Gate | Config, settings: WebSettings | None = None, *,
               clock: Callable[[], datetime] | None = None,
               kernel_loader: KernelLoader | None = None) -> FastAPI:
    """The application over *gate_or_config* (a Config opens its configured store)."""
    gate = gate_or_config if isinstance(gate_or_config, Gate) else Gate.open(gate_or_config)
    web = settings or WebSettings()
    app = FastAPI(
        lifespan=_lifespan,
        title="kmodgate",
        version=__version__,
        description="Kernel builds checked against tracked out-of-tree modules, "
                    "and the release streams they are gated through.",
        docs_url="/api/docs", redoc_url=None, openapi_url="/api/v1/openapi.json",
    )
    app.state.kmodgate = WebContext(
        gate=gate, settings=web, auditor=Auditor(web), templates=make_templates(),
        clock=clock or (lambda: datetime.now(UTC)),
        kernel_loader=kernel_loader or debian_kernel)

    from kmodgate.web import api, pages  # they import this module's helpers

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _install_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    return app


# The pages use no script at all; forbidding it makes any escaping slip inert.
PAGE_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
               "frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    """Adds the security headers to every response.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would wrap every
    response in a stream and cost each request a good part of a millisecond.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with_policy = not scope["path"].startswith("/api/docs")  # Swagger UI runs scripts

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "same-origin")
                if with_policy:
                    headers.setdefault("Content-Security-Policy", PAGE_POLICY)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def status_of(exc: KmodgateError) -> int:
    """The HTTP status a library error deserves."""
    if isinstance(exc, InfraError):
        return 503
    message = exc.message
    if message.startswith(("unknown kernel", "unknown stream", "unknown module",
                           "unknown result", "unknown advice", "no waiver", "no log")) \
            or " has no pin" in message:
        return 404
    if "pinned" in message or "may not enter" in message:
        return 409  # the request is fine; the state of the streams refuses it
    return 422


def problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith(API_PREFIX)


def error_response(request: Request, status: int, detail: str,
                   headers: dict[str, str] | None = None) -> Response:
    if wants_html(request):
        ctx = context(request)
        response: Response = ctx.templates.TemplateResponse(
            request, "error.html", {"status": status, "title": HTTPStatus(status).phrase,
                                    "detail": detail}, status_code=status)
    else:
        response = problem(status, detail)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _install_error_handlers(app: FastAPI) -> None:
    async def on_kmodgate(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KmodgateError)
        if isinstance(exc, InfraError):
            log.error("infrastructure error on %s: %s", request.url.path, exc)
        return error_response(request, status_of(exc), exc.message)

    async def on_auth(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuthError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(request, exc.status, exc.message, headers)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid"
        if wants_html(request):
            return error_response(request, 422, detail)
        return problem(422, detail, errors=errors)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(request, exc.status_code, str(exc.detail),
                              dict(exc.headers or {}))

    async def on_other(request: Request, exc: Exception) -> Response:
        # A bug: logged with its traceback here, one line for the client.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal error; the server log has the details")

    app.add_exception_handler(KmodgateError, on_kmodgate)
    app.add_exception_handler(UserError, on_kmodgate)
    app.add_exception_handler(InfraError, on_kmodgate)
    app.add_exception_handler(AuthError, on_auth)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_other)
