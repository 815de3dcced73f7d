"""Shared set-up for the web tests: a store with a small, telling scenario,
the web settings with one token, and a real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import uvicorn
import zstandard
from fastapi import FastAPI

from gate_fixtures import DAY, T0, free_port, make_gate, result
from kmodgate.gate.service import Gate
from kmodgate.web.app import create_app
from kmodgate.web.auth import token_hash
from kmodgate.web.settings import TokenHash, WebSettings

TOKEN = "correct-horse-battery-staple"
OLD, NEW = "6.1.0-47-amd64", "6.1.0-50-amd64"
NOW = T0 + DAY
EVIL = "<script>alert('kmodgate')</script>"
BUILD_REASON = "too few arguments to function 'hid_report_raw_event'"
LOG_TEXT = (
    "make -C /lib/modules/6.1.0-50-amd64/build M=/build modules\n"
    "  CC [M]  /build/driver/razerkbd_driver.o\n"
    f"/build/driver/razerkbd_driver.c:42:9: error: {BUILD_REASON}\n"
    f"   42 |         {EVIL} hid_report_raw_event(hdev, report);\n"
    "make: *** [Makefile:10: modules] Error 2\n"
)


@dataclass
class Scenario:
    gate: Gate
    settings: WebSettings
    log_path: Path
    audit_path: Path


def make_scenario(tmp_path: Path) -> Scenario:
    """Two kernels of 6.1/amd64: OLD (all pass, in next) and NEW, where
    openrazer-driver's build fails (with a log): NEW is blocked from next."""
    gate = make_gate(tmp_path)
    log_path = tmp_path / "logs" / "openrazer-build.log.zst"
    log_path.parent.mkdir()
    log_path.write_bytes(zstandard.ZstdCompressor().compress(LOG_TEXT.encode()))
    modules = ("openrazer-driver", "zfs", "v4l2loopback")
    gate.record_results([result(m, OLD, k) for m in modules for k in ("abi", "build")],
                        now=T0)
    gate.promote(OLD, "next", author="test", now=T0)
    gate.record_results(
        [result(m, NEW, k) for m in ("zfs", "v4l2loopback") for k in ("abi", "build")]
        + [result("openrazer-driver", NEW, "abi"),
           result("openrazer-driver", NEW, "build", "fail", log_path=str(log_path), reasons=[
               {"code": "too_many_arguments", "symbol": "hid_report_raw_event",
                "message": BUILD_REASON},
               {"code": "note", "message": EVIL}]),
           # A module the configuration does not track, named to break careless pages.
           result(EVIL, NEW, "abi", "fail", reasons=[{"code": "missing_symbol",
                                                      "message": EVIL}])],
        now=T0 + DAY / 2)
    audit = tmp_path / "audit.jsonl"
    settings = WebSettings(tokens=(TokenHash("release-team", token_hash(TOKEN)),),
                           audit_log=audit)
    return Scenario(gate=gate, settings=settings, log_path=log_path, audit_path=audit)


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    """A fresh store with the scenario's results (test modules import this fixture)."""
    s = make_scenario(tmp_path)
    yield s
    s.gate.close()


def fixed_clock(moment: datetime = NOW) -> datetime:
    return moment


def make_app(s: Scenario, settings: WebSettings | None = None) -> FastAPI:
    return create_app(s.gate, settings or s.settings, clock=fixed_clock)


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """*app* under a real uvicorn on a loopback port; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                          log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
