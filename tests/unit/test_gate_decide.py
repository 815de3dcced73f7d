"""Gate decisions, promotions, pins, waivers and status, on a SQLite store
with a fixed clock (soak and expiry are tested without sleeping)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodgate.errors import UserError
from kmodgate.gate.service import Gate
from kmodgate.gate.waivers import WaiverScope

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gate_fixtures import DAY, T0, all_pass, make_gate, result

K50, K51, K52 = "6.1.0-50-amd64", "6.1.0-51-amd64", "6.1.0-52-amd64"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = make_gate(tmp_path)
    yield g
    g.close()


def test_all_passing_is_allowed_into_the_first_stream(gate: Gate) -> None:
    all_pass(gate, K50)
    d = gate.decide(K50, "next", now=T0)
    data = d.to_json()
    assert data["allowed"] is True
    assert data["unsatisfied"] == [] and data["waived"] == []
    # required modules only (v4l2loopback is advisory), for both kinds
    assert sorted((c["module"], c["kind"]) for c in data["satisfied"]) == [
        ("openrazer-driver", "abi"), ("openrazer-driver", "build"),
        ("zfs", "abi"), ("zfs", "build")]
    assert data["soak"]["previous_stream"] is None and data["soak"]["satisfied"]
    assert data["line"] == "6.1/amd64"


def test_failure_and_missing_results_block(gate: Gate) -> None:
    gate.record_results([result("zfs", K50, "abi"), result("zfs", K50, "build", "fail",
                         reasons=[{"code": "implicit_declaration", "message": "boom"}]),
                         result("openrazer-driver", K50, "abi", "error",
                                reasons=[{"code": "apt", "message": "apt failed"}])], now=T0)
    d = gate.decide(K50, "next", now=T0)
    assert not d.allowed
    cells = {(c["module"], c["kind"]): c for c in d.unsatisfied}
    assert cells[("zfs", "build")]["outcome"] == "fail"
    assert cells[("zfs", "build")]["reasons"] == [{"code": "implicit_declaration",
                                                    "message": "boom"}]
    assert cells[("openrazer-driver", "abi")]["outcome"] == "error"
    assert cells[("openrazer-driver", "build")]["outcome"] == "missing"
    assert d.blockers and d.blockers[0].startswith("3 unsatisfied")


def test_advisory_module_never_blocks(gate: Gate) -> None:
    all_pass(gate, K50, modules=("openrazer-driver", "zfs"))
    gate.record_results([result("v4l2loopback", K50, "build", "fail")], now=T0)
    assert gate.decide(K50, "next", now=T0).allowed


def test_waiver_applies_until_it_expires(gate: Gate) -> None:
    all_pass(gate, K50)
    gate.record_results([result("openrazer-driver", K50, "build", "fail", version="1.1")],
                        now=T0 + DAY)  # a newer module version broke; latest result counts
    assert not gate.decide(K50, "next", now=T0 + DAY).allowed
    w = gate.waive(WaiverScope("openrazer-driver", "6.1.0-5*-amd64", "build"),
                   reason="fix queued upstream", author="alice", duration=2 * DAY,
                   now=T0 + DAY)
    d = gate.decide(K50, "next", now=T0 + DAY)
    assert d.allowed
    assert d.waiver_ids == [w["id"]]
    assert d.waived[0]["waiver"]["reason"] == "fix queued upstream"
    # expired: stops applying on its own
    later = gate.decide(K50, "next", now=T0 + 3 * DAY + DAY)
    assert not later.allowed and later.waived == []
    # the waiver's scope is respected: another kind is not covered
    assert gate.waivers(now=T0 + 10 * DAY) == []
    assert len(gate.waivers(include_inactive=True, now=T0)) == 1


def test_waiver_scope_and_revocation(gate: Gate) -> None:
    all_pass(gate, K50)
    gate.record_results([result("zfs", K50, "abi", "fail", version="2")], now=T0 + DAY)
    w = gate.waive(WaiverScope("zfs", "6.1.0-4*", "*"), reason="r", author="a", now=T0)
    assert not gate.decide(K50, "next", now=T0 + DAY).allowed  # pattern does not match
    w2 = gate.waive(WaiverScope("z*", "*", "abi"), reason="r", author="a", now=T0)
    assert gate.decide(K50, "next", now=T0 + DAY).waiver_ids == [w2["id"]]
    gate.revoke_waiver(w2["id"], now=T0 + 2 * DAY)
    assert not gate.decide(K50, "next", now=T0 + 2 * DAY).allowed
    assert w["id"] != w2["id"]


def test_waiver_validation(gate: Gate) -> None:
    with pytest.raises(UserError, match="needs a reason"):
        gate.waive(WaiverScope("zfs", "*"), reason=" ", author="a", now=T0)
    with pytest.raises(UserError, match="expire in the past"):
        gate.waive(WaiverScope("zfs", "*"), reason="r", author="a", expires_at=T0, now=T0)
    with pytest.raises(UserError, match="unknown module 'nvidia'"):
        gate.waive(WaiverScope("nvidia", "*"), reason="r", author="a", now=T0)
    with pytest.raises(UserError, match="unknown check kind"):
        gate.waive(WaiverScope("zfs", "*", "boot"), reason="r", author="a", now=T0)


def test_soak_in_previous_stream(gate: Gate) -> None:
    all_pass(gate, K50)
    d = gate.decide(K50, "testing", now=T0)
    assert not d.allowed and d.soak["entered_at"] is None
    assert "never entered next" in d.blockers[0]
    gate.promote(K50, "next", author="ci", now=T0)
    d = gate.decide(K50, "testing", now=T0 + DAY)
    assert not d.allowed
    assert d.soak["soaked_seconds"] == 86400 and d.soak["remaining_seconds"] == 2 * 86400
    assert d.blockers == ["soaking in next: 2d left of 3d"]
    assert gate.decide(K50, "testing", now=T0 + 3 * DAY).allowed


def test_promote_refuses_then_force_is_audited(gate: Gate) -> None:
    gate.record_results([result("zfs", K50, "build", "fail")], now=T0)
    with pytest.raises(UserError, match=f"{K50} may not enter next: .*unsatisfied"):
        gate.promote(K50, "next", author="ci", now=T0)
    with pytest.raises(UserError, match="needs a reason"):
        gate.promote(K50, "next", author="ci", force=True, now=T0)
    p = gate.promote(K50, "next", author="bob", force=True, reason="security fix", now=T0)
    assert p["via"] == "force" and p["reason"] == "security fix" and p["author"] == "bob"
    assert p["decision"]["allowed"] is False  # what was overridden stays on record
    again = gate.promote(K50, "next", author="bob", force=True, reason="again", now=T0 + DAY)
    assert again["id"] == p["id"]  # already current: nothing new recorded


def test_forbid_older_than_current(gate: Gate) -> None:
    for k in (K50, K51):
        all_pass(gate, k)
        gate.promote(k, "next", author="ci", now=T0)
    gate.promote(K51, "testing", author="ci", now=T0 + 3 * DAY)
    d = gate.decide(K50, "testing", now=T0 + 4 * DAY)
    assert not d.allowed and d.current == {"kernel": K51, "since": (T0 + 3 * DAY).isoformat(),
                                            "older": True}
    assert d.blockers == [f"older than testing's current kernel {K51}"]
    # next does not forbid older kernels
    assert gate.decide(K50, "next", now=T0).allowed


def test_pin_holds_the_stream_until_unpinned(gate: Gate) -> None:
    for k in (K50, K51, K52):
        all_pass(gate, k)
    gate.promote(K51, "next", author="ci", now=T0)
    pin = gate.pin("next", K50, author="alice", reason="K51 eats disks", now=T0 + DAY)
    assert pin["kernel"] == K50 and pin["line"] == "6.1/amd64"
    # the pin rolled the stream back
    status = {s["stream"]: s for s in gate.status(now=T0 + DAY)}
    assert status["next"]["lines"][0]["current"] == K50
    assert status["next"]["lines"][0]["pin"]["reason"] == "K51 eats disks"
    d = gate.decide(K52, "next", now=T0 + DAY)
    assert not d.allowed and "pinned to 6.1.0-50-amd64 by alice" in d.blockers[0]
    with pytest.raises(UserError, match="pinned"):
        gate.promote(K52, "next", author="ci", force=True, reason="x", now=T0 + DAY)
    with pytest.raises(UserError, match="already pinned"):
        gate.pin("next", K52, author="bob", reason="x", now=T0 + DAY)
    gate.unpin("next", author="alice", now=T0 + 2 * DAY)
    assert gate.promote(K52, "next", author="ci", now=T0 + 2 * DAY)["via"] == "decision"
    with pytest.raises(UserError, match="has no pin"):
        gate.unpin("next", author="alice", now=T0 + 2 * DAY)


def test_status_lists_candidates_and_blockers(gate: Gate) -> None:
    all_pass(gate, K50)
    all_pass(gate, K51)
    gate.record_results([result("zfs", K52, "build", "fail")], now=T0)
    gate.promote(K50, "next", author="ci", now=T0)
    gate.promote(K51, "next", author="ci", now=T0 + DAY)
    s = {x["stream"]: x for x in gate.status(now=T0 + 2 * DAY)}
    nxt = s["next"]["lines"][0]
    assert nxt["current"] == K51
    assert [c["kernel"] for c in nxt["candidates"]] == [K52]
    assert not nxt["candidates"][0]["allowed"]
    testing = s["testing"]["lines"][0]
    assert testing["current"] is None
    # candidates for testing are the kernels that reached next, newest first
    assert [(c["kernel"], c["allowed"]) for c in testing["candidates"]] == [
        (K51, False), (K50, False)]
    assert "soaking in next" in testing["candidates"][0]["blockers"][0]
    assert s["stable"]["policy"]["modules"] == ["zfs"]


def test_unknown_kernel_and_stream(gate: Gate) -> None:
    with pytest.raises(UserError, match="unknown kernel"):
        gate.decide("6.1.0-99-amd64", "next", now=T0)
    all_pass(gate, K50)
    with pytest.raises(UserError, match="unknown stream 'prod'"):
        gate.decide(K50, "prod", now=T0)


def test_lines_are_independent(gate: Gate) -> None:
    k612 = "6.12.57+deb12-amd64"
    all_pass(gate, K50)
    all_pass(gate, k612)
    gate.promote(k612, "next", author="ci", now=T0)
    gate.promote(K50, "next", author="ci", now=T0)
    lines = {x["line"]: x["current"] for x in gate.status(now=T0)[0]["lines"]}
    assert lines == {"6.1/amd64": K50, "6.12/amd64": k612}


def test_record_results_counts_and_error_is_replaced(gate: Gate) -> None:
    r = result("zfs", K50, "abi", "error")
    assert gate.record_results([r], now=T0)["new"] == 1
    assert gate.known_fingerprints("abi", [r.fingerprint]) == set()  # errors are redone
    counts = gate.record_results([result("zfs", K50, "abi", "pass")], now=T0)
    assert counts == {"new": 0, "unchanged": 0, "replaced": 1}
    counts = gate.record_results([result("zfs", K50, "abi", "fail")], now=T0)
    assert counts["unchanged"] == 1  # same inputs: the first real result stands
    assert gate.known_fingerprints("abi", [r.fingerprint, "other"]) == {r.fingerprint}
    with pytest.raises(UserError, match="unknown check kind"):
        gate.record_results([result("zfs", K50, "boot")], now=T0)


def test_a_check_with_no_binary_because_the_build_failed_says_so(gate: Gate) -> None:
    gate.record_results([result("zfs", K50, "build", "fail"),
                         result("openrazer-driver", K50, "build")], now=T0)
    cells = {(c["module"], c["kind"]): c for c in gate.decide(K50, "next", now=T0).unsatisfied}
    [no_binary] = cells[("zfs", "abi")]["reasons"]
    assert no_binary["code"] == "no_binary"
    assert "did not build" in no_binary["message"]
    # Where the build passed, the abi result is simply not there yet.
    assert cells[("openrazer-driver", "abi")]["reasons"][0]["code"] == "result_missing"
