"""The gate's proof on real archive data, through the installed command.

The Debian 6.1 amd64 line (every ABI the archive still has) and four DKMS
packages: sync builds and checks them, finds openrazer's regression (its
build breaks when hid_report_raw_event() gains an argument inside the 6.1
stable series) with last-good and first-bad kernels and the compiler's
reason, mails its maintainer once through a real SMTP server on loopback,
and `gate decide` refuses the newest kernel for stable until a waiver.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gate_fixtures import SmtpServer
from kmodgate.sources.kernels import expand_kernel_refs

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))
MODULES = {
    "openrazer-driver": "openrazer-driver-dkms",
    "acpi-call": "acpi-call-dkms",
    "v4l2loopback": "v4l2loopback-dkms",
    "dm-writeboost": "dm-writeboost-dkms",
}


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def line() -> list[str]:
    releases = [r.removeprefix("debian:") for r in expand_kernel_refs(["debian-line:6.1/amd64"])]
    if not releases or releases[0] != "6.1.0-47-amd64" or len(releases) < 3:
        pytest.skip("the archive no longer offers 6.1.0-47-amd64, openrazer's last good ABI "
                    f"(it offers {releases})")
    return releases


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, smtp: SmtpServer, line: list[str]) -> Path:
    root = tmp_path_factory.mktemp("gate")
    modules = "".join(
        f'[modules.{name}]\nsource = "debian:{package}"\n'
        f'maintainers = ["{name}@example.org"]\n\n'
        for name, package in MODULES.items())
    path = root / "kmodgate.toml"
    path.write_text(f"""\
[store]
url = "sqlite:///kmodgate.db"

[[sources]]
name = "debian"
type = "debian"
flavour = "amd64"
pattern = "6.1.0-*"

{modules}
[[streams]]
name = "next"
kinds = ["abi", "build"]

[[streams]]
name = "stable"
kinds = ["abi", "build"]

[notify.email]
host = "127.0.0.1"
port = {smtp.port}
from = "kmodgate <kmodgate@example.org>"
""")
    return path


def kmodgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KMODGATE, *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=1800)


def as_json(config: Path, *args: str, expect: int) -> Any:
    proc = kmodgate(config, *args, "--json")
    assert proc.returncode == expect, (proc.stdout[-2000:], proc.stderr[-2000:])
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def synced(config: Path) -> dict[str, Any]:
    report: dict[str, Any] = as_json(config, "sync", expect=0)
    return report


def test_sync_finds_openrazers_regression_with_its_reason(
    synced: dict[str, Any], config: Path, line: list[str]
) -> None:
    assert synced["kernels"] == line
    history = as_json(config, "history", "openrazer-driver", expect=0)
    [regression] = [r for r in history["open"] if r["kind"] == "build"]
    assert (regression["line"], regression["last_good"], regression["first_bad"]) == (
        "6.1/amd64", "6.1.0-47-amd64", line[1])
    assert "hid_report_raw_event" in json.dumps(regression["changes"])
    assert regression["reproducer"]
    # The modules that build everywhere have no regression.
    for name in ("acpi-call",):
        assert as_json(config, "history", name, expect=0)["open"] == []


def test_one_email_for_the_regression_and_none_on_a_second_sync(
    synced: dict[str, Any], config: Path, smtp: SmtpServer, line: list[str]
) -> None:
    def openrazer_mails() -> list[Any]:
        return [m for rcpts, m in smtp.mailbox.messages
                if "openrazer-driver@example.org" in rcpts
                and "openrazer-driver fails to build" in m["Subject"]]

    [mail] = openrazer_mails()
    assert mail["Subject"] == f"[kmodgate] openrazer-driver fails to build on {line[1]}"
    body = mail.get_body(preferencelist=("plain",)).get_content()
    for needed in ("hid_report_raw_event", "6.1.0-47-amd64", line[1], "kmodgate check"):
        assert needed in body
    again = as_json(config, "sync", expect=0)
    assert again["results"].get("new", 0) == 0 and again["events"] == []
    assert len(openrazer_mails()) == 1


def test_decide_refuses_stable_until_a_waiver(synced: dict[str, Any], config: Path,
                                              line: list[str]) -> None:
    newest = line[-1]
    refused = as_json(config, "gate", "decide", newest, "--stream", "stable", expect=1)
    assert {(u["module"], u["kind"]) for u in refused["unsatisfied"]} >= {
        ("openrazer-driver", "build")}
    as_json(config, "gate", "waive", "--module", "openrazer-driver", "--kernel", "6.1.0-*",
            "--reason", "fix for the new hid_report_raw_event() queued upstream",
            "--expires", "30d", "--author", "kernel-team", expect=0)
    allowed = as_json(config, "gate", "decide", newest, "--stream", "stable", expect=0)
    assert allowed["allowed"] is True
    assert {w["module"] for w in allowed["waived"]} == {"openrazer-driver"}
