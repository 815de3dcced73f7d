"""Shared set-up for the gate, store and notification tests: a configuration,
results as the check engines would produce them, a fixed clock."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine

from conftest import missing
from kmodgate.abi.compare import Outcome
from kmodgate.config import Config, parse_config
from kmodgate.gate.service import Gate
from kmodgate.results import CheckResult
from kmodgate.store.db import open_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)

CONFIG = """\
[[sources]]
name = "debian"
type = "debian"
flavour = "amd64"

[modules.openrazer-driver]
source = "debian-source:openrazer"
maintainers = ["razer@example.org"]
tags = ["input"]

[modules.zfs]
source = "debian-source:zfs-linux"
maintainers = ["zfs@example.org"]
tags = ["fs"]

[modules.v4l2loopback]
source = "debian-source:v4l2loopback"
required = false

[[streams]]
name = "next"
kinds = ["abi", "build"]

[[streams]]
name = "testing"
kinds = ["abi", "build"]
min_soak = "3d"
forbid_older = true

[[streams]]
name = "stable"
kinds = ["abi", "build"]
modules = ["zfs"]
min_soak = "7d"
forbid_older = true
"""


def make_config(tmp_path: Path, text: str = CONFIG, url: str | None = None) -> Config:
    path = tmp_path / "kmodgate.toml"
    body = text if url is None else f'[store]\nurl = "{url}"\n\n{text}'
    path.write_text(body)
    return parse_config(body, path)


def make_gate(tmp_path: Path, text: str = CONFIG, url: str | None = None) -> Gate:
    config = make_config(tmp_path, text, url)
    return Gate(config, open_store(config.store_url))


def result(module: str, kernel: str, kind: str = "abi", outcome: str = "pass", *,
           version: str = "1.0", reasons: list[dict[str, Any]] | None = None,
           log_path: str | None = None) -> CheckResult:
    if reasons is None and outcome == "fail":
        reasons = [{"code": "crc_mismatch", "symbol": "input_event",
                    "message": "input_event: CRC 0x1 != 0x2", "required_crc": "0x00000001",
                    "provided_crc": "0x00000002"}]
    return CheckResult(
        module=module, module_version=version, kernel=kernel, kind=kind,
        outcome=Outcome(outcome), reasons=reasons or [],
        fingerprint=f"{module}@{version}|{kernel}|{kind}",
        reproducer=f"kmodgate check --kind {kind} --kernel debian:{kernel} --module {module}",
        log_path=log_path,
    )


def all_pass(gate: Gate, kernel: str, now: datetime = T0,
             modules: tuple[str, ...] = ("openrazer-driver", "zfs", "v4l2loopback")) -> None:
    gate.record_results([result(m, kernel, k) for m in modules for k in ("abi", "build")],
                        now=now)


# PostgreSQL: a real server, started from Debian's postgresql package into a
# scratch directory on a loopback port, one per test session; a fresh
# database per test.

def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a running PostgreSQL server (no database part)."""
    bindir = _postgres_bindir()
    if bindir is None:
        missing("postgresql is not installed (scripts/apt-packages.txt lists it)")
    # initdb refuses to run as root: run the server as Debian's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="kmodgate-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip()} {log[-2000:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kmodgate",
        "-E", "UTF8", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
        "start")
    try:
        yield f"postgresql+psycopg://kmodgate@127.0.0.1:{port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_database(server: str) -> Iterator[str]:
    """A fresh, empty database on *server*, dropped afterwards."""
    name = f"kmodgate_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
        yield f"{server}/{name}"
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        admin.dispose()


BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every storage test runs on every backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kmodgate.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as url:
        yield url


# A real SMTP server on loopback (aiosmtpd), for the notification tests.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mailbox:
    """aiosmtpd handler: keeps what it receives; refuses addresses at nowhere.invalid."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.endswith("@nowhere.invalid"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


class SmtpServer:
    """A real SMTP server on a fixed loopback port that can be started later."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mailbox = Mailbox()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
