"""Shared set-up for the gate, store and notification tests: a configuration,
results as the check engines would produce them, a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
