"""Notifications over the wire: a real SMTP server on loopback (aiosmtpd) and
a real HTTP receiver, both down for a while.  Nothing is lost, nothing is
sent twice, across a restart of kmodgate."""

from __future__ import annotations

import json
import lzma
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kmodgate.gate.service import Gate
from kmodgate.notify.webhook import SIGNATURE_HEADER, verify_signature
from kmodgate.store.db import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gate_fixtures import CONFIG, DAY, T0, SmtpServer, free_port, make_config, result

pytestmark = pytest.mark.integration

SECRET = "webhook-secret"
S = timedelta(seconds=1)


class HookReceiver:
    """A real HTTP server: records signed POSTs; answers 503 while `failing`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.failing = False
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.failing:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.requests.append({
                    "path": self.path, "body": body, "json": json.loads(body),
                    "signature": self.headers.get(SIGNATURE_HEADER),
                    "delivery": self.headers.get("X-Kmodgate-Delivery"),
                    "event": self.headers.get("X-Kmodgate-Event"),
                })
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    yield server
    server.stop()


@pytest.fixture
def hook() -> Iterator[HookReceiver]:
    receiver = HookReceiver()
    yield receiver
    receiver.stop()


def notify_config(smtp: SmtpServer, hook: HookReceiver, extra_to: str = "") -> str:
    return CONFIG + f"""
[notify.email]
host = "127.0.0.1"
port = {smtp.port}
from = "kmodgate <kmodgate@example.org>"
to = ["kernel-team@example.org"{extra_to}]

[[notify.webhooks]]
url = "{hook.url}"
secret = "{SECRET}"
"""


def record_regression(gate: Gate, tmp_path: Path) -> None:
    log = tmp_path / "openrazer-6.1.0-50.log.xz"
    log.write_bytes(lzma.compress(
        b"  CC [M]  /build/openrazer/driver/razerkbd_driver.o\n"
        b"driver/razerkbd_driver.c:1201:9: error: 'struct hid_device' has no member named"
        b" 'dev_rdesc'\nmake[1]: *** [Makefile:1906: /build/openrazer] Error 2\n"))
    gate.record_results([
        result("openrazer-driver", "6.1.0-49-amd64", "build"),
        result("openrazer-driver", "6.1.0-50-amd64", "build", "fail", log_path=str(log),
               reasons=[{"code": "missing_member",
                         "message": "'struct hid_device' has no member named 'dev_rdesc'",
                         "file": "driver/razerkbd_driver.c", "line": 1201}]),
    ], now=T0)


def test_down_then_up_nothing_lost_nothing_doubled(
        tmp_path: Path, smtp: SmtpServer, hook: HookReceiver) -> None:
    config = make_config(tmp_path, notify_config(smtp, hook))
    gate = Gate(config, open_store(config.store_url))
    record_regression(gate, tmp_path)
    [event] = gate.emit_events(now=T0)
    assert event["kind"] == "regression"

    # Both receivers down: every delivery waits for its retry.
    report = gate.deliver(now=T0)
    assert (report.delivered, report.retried, report.failed) == (0, 3, 0)
    assert gate.deliver(now=T0 + 10 * S).retried == 0  # backing off: nothing due yet

    # SMTP comes up; the web receiver is up but failing.
    smtp.start()
    hook.failing = True
    hook.start()
    report = gate.deliver(now=T0 + 31 * S)
    assert (report.delivered, report.retried) == (2, 1)
    assert "HTTP 503" in report.errors[0]
    gate.close()

    # kmodgate restarts (a new process would open the store afresh); the receiver recovers.
    hook.failing = False
    restarted = Gate(config, open_store(config.store_url))
    assert restarted.deliver(now=T0 + 40 * S).delivered == 0  # webhook backs off 60s
    assert restarted.deliver(now=T0 + 2 * 60 * S).delivered == 1
    assert restarted.emit_events(now=T0 + DAY) == []  # the same regression: no new event
    assert restarted.deliver(now=T0 + DAY).delivered == 0
    assert restarted.outbox().counts() == {"pending": 0, "delivered": 3, "failed": 0}
    restarted.close()

    # Exactly one mail per recipient, with what a maintainer needs.
    recipients = sorted(r for rcpts, _ in smtp.mailbox.messages for r in rcpts)
    assert recipients == ["kernel-team@example.org", "razer@example.org"]
    _, mail = smtp.mailbox.messages[0]
    assert mail["Subject"] == "[kmodgate] openrazer-driver fails to build on 6.1.0-50-amd64"
    text = mail.get_content()
    assert "First bad:  6.1.0-50-amd64" in text
    assert "Last good:  6.1.0-49-amd64" in text
    assert "has no member named 'dev_rdesc'" in text
    assert "kmodgate check --kind build --kernel debian:6.1.0-50-amd64" in text
    assert "razerkbd_driver.c:1201:9: error:" in text  # the log excerpt
    ids = {m["Message-ID"] for _, m in smtp.mailbox.messages}
    assert len(ids) == 2

    # One signed webhook call.
    [call] = hook.requests
    assert verify_signature(SECRET, call["body"], call["signature"])
    assert not verify_signature("wrong", call["body"], call["signature"])
    assert call["event"] == "regression" and call["delivery"]
    assert call["json"]["payload"]["first_bad"] == "6.1.0-50-amd64"
    assert call["json"]["payload"]["last_good"] == "6.1.0-49-amd64"
    assert call["json"]["subject"] == mail["Subject"]


def test_fix_and_decision_events_reach_everyone_once(
        tmp_path: Path, smtp: SmtpServer, hook: HookReceiver) -> None:
    smtp.start()
    hook.start()
    config = make_config(tmp_path, notify_config(smtp, hook))
    gate = Gate(config, open_store(config.store_url))
    record_regression(gate, tmp_path)
    gate.emit_events(now=T0)
    gate.deliver(now=T0)
    gate.record_results([result("openrazer-driver", "6.1.0-51-amd64", "build")], now=T0 + DAY)
    for m in ("openrazer-driver", "zfs"):
        gate.record_results([result(m, "6.1.0-51-amd64", "abi")], now=T0 + DAY)
    gate.record_results([result("zfs", "6.1.0-51-amd64", "build")], now=T0 + DAY)
    kinds = sorted(e["kind"] for e in gate.emit_events(now=T0 + DAY))
    assert kinds == ["decision", "fix"]  # 6.1.0-51 may now enter next
    assert gate.deliver(now=T0 + DAY).delivered == 5  # fix: 2 mails + hook; decision: mail + hook
    assert gate.emit_events(now=T0 + 2 * DAY) == []
    assert gate.deliver(now=T0 + 2 * DAY).delivered == 0
    subjects = sorted(m["Subject"] for _, m in smtp.mailbox.messages)
    assert "[kmodgate] openrazer-driver builds again on 6.1.0-51-amd64" in subjects
    assert "[kmodgate] 6.1.0-51-amd64 may now enter next" in subjects
    assert len(hook.requests) == 3
    gate.close()


def test_refused_recipient_is_given_up_not_retried(
        tmp_path: Path, smtp: SmtpServer, hook: HookReceiver) -> None:
    smtp.start()
    hook.start()
    config = make_config(tmp_path, notify_config(smtp, hook, ', "gone@nowhere.invalid"'))
    gate = Gate(config, open_store(config.store_url))
    record_regression(gate, tmp_path)
    gate.emit_events(now=T0)
    report = gate.deliver(now=T0)
    assert (report.delivered, report.failed) == (3, 1)
    assert "recipient refused" in report.errors[0]
    assert gate.deliver(now=T0 + DAY).failed == 0  # never tried again
    assert gate.outbox().counts() == {"pending": 0, "delivered": 3, "failed": 1}
    gate.close()


def test_a_claimed_delivery_is_not_sent_by_another_worker(
        tmp_path: Path, smtp: SmtpServer, hook: HookReceiver) -> None:
    """A worker that died after claiming holds its rows until the lease ends;
    then another worker sends them, with the same Message-ID as the first
    worker would have used."""
    smtp.start()
    hook.start()
    config = make_config(tmp_path, notify_config(smtp, hook))
    gate = Gate(config, open_store(config.store_url))
    record_regression(gate, tmp_path)
    gate.emit_events(now=T0)
    dead = gate.outbox(worker="dead")
    claimed = dead._claim(T0, 100)  # claimed, then the process was killed before sending
    assert len(claimed) == 3
    other = gate.outbox(worker="alive")
    assert other.deliver_due(T0 + 60 * S).delivered == 0  # the lease still holds
    assert other.deliver_due(T0 + 6 * 60 * S).delivered == 3
    assert len(smtp.mailbox.messages) == 2 and len(hook.requests) == 1
    gate.close()
