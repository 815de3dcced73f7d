"""First-bad / last-good / fix detection per kernel line, and the events it
raises: once per regression, never repeated, a fix only after a regression
people were told about, decision changes."""

from __future__ import annotations

import lzma
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kmodgate.gate.service import Gate
from kmodgate.gate.waivers import WaiverScope
from kmodgate.store.models import Delivery, Event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gate_fixtures import CONFIG, DAY, T0, all_pass, make_gate, result

NOTIFY = CONFIG + """
[notify.email]
host = "127.0.0.1"
from = "kmodgate@example.org"
to = ["kernel-team@example.org"]

[[notify.webhooks]]
url = "http://127.0.0.1:9/hook"
events = ["decision"]
"""


def k(n: int) -> str:
    return f"6.1.0-{n}-amd64"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = make_gate(tmp_path, NOTIFY)
    yield g
    g.close()


def test_first_bad_last_good_and_fix(gate: Gate) -> None:
    # Recorded out of order, as parallel checks finish: the line order decides.
    outcomes = {48: "pass", 52: "fail", 49: "pass", 50: "fail", 51: "error", 53: "pass",
                54: "fail"}
    gate.record_results([result("openrazer-driver", k(n), "build", o,
                                reasons=[{"code": "missing_member", "message": f"m{n}",
                                          "file": "driver/razerkbd.c", "line": 10}]
                                if o == "fail" else None)
                         for n, o in outcomes.items()], now=T0)
    h = gate.history("openrazer-driver")
    [line] = h["lines"]
    assert line["line"] == "6.1/amd64" and line["kind"] == "build"
    assert [x["kernel"] for x in line["kernels"]] == [k(n) for n in range(48, 55)]
    first, second = line["regressions"]
    assert (first["last_good"], first["first_bad"], first["fixed_in"]) == (k(49), k(50), k(53))
    assert first["changes"] == [{"code": "missing_member", "message": "m50",
                                 "file": "driver/razerkbd.c", "line": 10}]
    assert (second["last_good"], second["first_bad"], second["fixed_in"]) == (k(53), k(54),
                                                                              None)
    assert h["open"] == [second]


def test_abi_changes_are_the_symbols(gate: Gate) -> None:
    gate.record_results([
        result("zfs", k(50), "abi"),
        result("zfs", k(51), "abi", "fail", reasons=[
            {"code": "crc_mismatch", "symbol": "bio_alloc", "message": "m",
             "required_crc": "0x00000001", "provided_crc": "0x00000002"},
            {"code": "missing_symbol", "symbol": "blk_queue_flag_set", "message": "m"},
            {"code": "vermagic_mismatch", "message": "vermagic"}]),
    ], now=T0)
    [reg] = gate.history("zfs")["open"]
    assert reg["changes"] == [
        {"symbol": "bio_alloc", "change": "crc", "required_crc": "0x00000001",
         "provided_crc": "0x00000002"},
        {"symbol": "blk_queue_flag_set", "change": "removed"}]


def count(gate: Gate, model: type[Event] | type[Delivery]) -> int:
    with gate.store.transaction() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def test_events_once_per_regression_and_fix(gate: Gate, tmp_path: Path) -> None:
    log = tmp_path / "build.log.xz"
    log.write_bytes(lzma.compress(b"make -C /lib/modules/x\n  CC driver/razerkbd.o\n"
                                  b"driver/razerkbd.c:10:5: error: no member named 'foo'\n"))
    gate.record_results([result("openrazer-driver", k(49), "build"),
                         result("openrazer-driver", k(50), "build", "fail",
                                log_path=str(log))], now=T0)
    events = gate.emit_events(now=T0)
    regressions = [e for e in events if e["kind"] == "regression"]
    assert [e["key"] for e in regressions] == [
        f"regression openrazer-driver build 6.1/amd64 {k(50)}"]
    # the maintainer and the team list, one outbox row each
    with gate.store.transaction() as s:
        rows = s.scalars(select(Delivery).where(Delivery.event_id == regressions[0]["id"]))
        assert sorted(d.recipient for d in rows) == ["kernel-team@example.org",
                                                     "razer@example.org"]
        event = s.get(Event, regressions[0]["id"])
        assert event is not None and "error: no member named" in event.payload["log_excerpt"]
    before = (count(gate, Event), count(gate, Delivery))
    assert gate.emit_events(now=T0 + DAY) == []  # nothing new: nothing emitted, nothing queued
    assert (count(gate, Event), count(gate, Delivery)) == before
    # a fix, once
    gate.record_results([result("openrazer-driver", k(51), "build")], now=T0 + DAY)
    fixes = [e for e in gate.emit_events(now=T0 + DAY) if e["kind"] == "fix"]
    assert [e["key"] for e in fixes] == [
        f"fix openrazer-driver build 6.1/amd64 {k(50)} {k(51)}"]
    assert [e for e in gate.emit_events(now=T0 + 2 * DAY) if e["kind"] == "fix"] == []


def test_history_that_nobody_was_told_about_stays_quiet(gate: Gate) -> None:
    gate.record_results([result("zfs", k(n), "abi", o) for n, o in
                         ((48, "pass"), (49, "fail"), (50, "pass"))], now=T0)
    assert [e for e in gate.emit_events(now=T0) if e["kind"] in ("regression", "fix")] == []


def test_decision_change_events(gate: Gate) -> None:
    gate.record_results([result("zfs", k(50), "build", "fail")], now=T0)
    all_pass(gate, k(50), modules=("openrazer-driver",))
    gate.record_results([result("zfs", k(50), "abi")], now=T0)
    # blocked on first sight: the regression explains it, no decision event
    assert [e for e in gate.emit_events(now=T0) if e["kind"] == "decision"] == []
    gate.waive(WaiverScope("zfs", k(50), "build"), reason="known", author="a",
               duration=DAY, now=T0)
    changed = [e for e in gate.emit_events(now=T0 + DAY / 2) if e["kind"] == "decision"]
    assert [e["key"] for e in changed] == [f"decision next {k(50)} 2"]
    # still allowed: no repeat
    assert [e for e in gate.emit_events(now=T0 + DAY / 2) if e["kind"] == "decision"] == []
    # the waiver expires: blocked again, a new event
    changed = [e for e in gate.emit_events(now=T0 + 2 * DAY) if e["kind"] == "decision"]
    assert [e["key"] for e in changed] == [f"decision next {k(50)} 3"]
    with gate.store.transaction() as s:
        hooks = s.scalars(select(Delivery.recipient).join(Event)
                          .where(Event.kind == "decision")).all()
    assert set(hooks) == {"http://127.0.0.1:9/hook", "kernel-team@example.org"}
