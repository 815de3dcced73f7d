"""The gate through the installed command: decide, waive, promote, pin, status, history.

Results are recorded through the library (as sync would); every decision is
asked of the real `kmodgate` binary against the same SQLite store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gate_fixtures import make_gate, result

pytestmark = pytest.mark.e2e

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))
OLD, NEW = "6.1.0-47-amd64", "6.1.0-50-amd64"


def kmodgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KMODGATE, *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=120)


def as_json(config: Path, *args: str, expect: int) -> Any:
    proc = kmodgate(config, *args, "--json")
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    gate = make_gate(tmp_path)
    modules = ("openrazer-driver", "zfs", "v4l2loopback")
    gate.record_results([result(m, OLD, k) for m in modules for k in ("abi", "build")])
    gate.record_results(
        [result(m, NEW, k) for m in ("zfs", "v4l2loopback") for k in ("abi", "build")]
        + [result("openrazer-driver", NEW, "abi"),
           result("openrazer-driver", NEW, "build", "fail", reasons=[{
               "code": "too_many_arguments", "symbol": "hid_report_raw_event",
               "message": "too few arguments to function 'hid_report_raw_event'"}])])
    gate.close()
    return tmp_path / "kmodgate.toml"


def test_decide_refuses_until_waived_then_promotes(config: Path) -> None:
    refused = as_json(config, "gate", "decide", NEW, "--stream", "next", expect=1)
    assert refused["allowed"] is False
    [blocking] = refused["unsatisfied"]
    assert (blocking["module"], blocking["kind"], blocking["outcome"]) == (
        "openrazer-driver", "build", "fail")
    assert "hid_report_raw_event" in json.dumps(blocking["reasons"])

    human = kmodgate(config, "gate", "decide", NEW, "--stream", "next")
    assert human.returncode == 1 and "not allowed" in human.stdout

    refused_promotion = kmodgate(config, "gate", "promote", NEW, "--to", "next")
    assert refused_promotion.returncode != 0
    assert "Traceback" not in refused_promotion.stderr

    waiver = as_json(config, "gate", "waive", "--module", "openrazer-driver", "--kernel",
                     "6.1.0-5*", "--kind", "build", "--reason", "fix queued upstream",
                     "--expires", "7d", "--author", "kernel-team", expect=0)
    allowed = as_json(config, "gate", "decide", NEW, "--stream", "next", expect=0)
    assert allowed["allowed"] is True
    assert allowed["waivers"] == [waiver["id"]]
    assert [w["module"] for w in allowed["waived"]] == ["openrazer-driver"]

    promoted = as_json(config, "gate", "promote", NEW, "--to", "next", "--author", "ci",
                       expect=0)
    assert promoted["stream"] == "next" and promoted["author"] == "ci"
    status = as_json(config, "gate", "status", expect=0)
    nxt = next(s for s in status["streams"] if s["stream"] == "next")
    assert [line["current"] for line in nxt["lines"]] == [NEW]

    # Revoked, the waiver no longer applies.
    assert kmodgate(config, "gate", "revoke", str(waiver["id"])).returncode == 0
    assert as_json(config, "gate", "decide", NEW, "--stream", "next", expect=1)["waived"] == []


def test_force_needs_a_reason_and_pins_hold(config: Path) -> None:
    no_reason = kmodgate(config, "gate", "promote", NEW, "--to", "next", "--force")
    assert no_reason.returncode == 2
    assert no_reason.stderr.startswith("kmodgate: error:") and "--reason" in no_reason.stderr
    forced = as_json(config, "gate", "promote", NEW, "--to", "next", "--force", "--reason",
                     "security fix", "--author", "lead", expect=0)
    assert forced["via"] != "decision" and forced["reason"] == "security fix"
    as_json(config, "gate", "pin", "next", OLD, "--reason", "regression in the field",
            expect=0)
    status = as_json(config, "gate", "status", expect=0)
    nxt = next(s for s in status["streams"] if s["stream"] == "next")
    assert nxt["lines"][0]["pin"]["kernel"] == OLD


def test_history_shows_the_regression_and_unknown_input_is_one_line(config: Path) -> None:
    history = as_json(config, "history", "openrazer-driver", expect=0)
    [regression] = history["open"]
    assert (regression["kind"], regression["last_good"], regression["first_bad"]) == (
        "build", OLD, NEW)
    for args in (["history", "no-such-module"], ["gate", "decide", "9.9.9-1-amd64",
                                                 "--stream", "next"],
                 ["gate", "decide", NEW, "--stream", "no-such-stream"]):
        proc = kmodgate(config, *args)
        assert proc.returncode == 2, args
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kmodgate: error:")
    missing = subprocess.run([KMODGATE, "gate", "status", "--config", "/nonexistent.toml"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nonexistent.toml" in missing.stderr
