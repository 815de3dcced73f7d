"""The decision cache: a cached decision is never stale.

Gate.decide answers from per-kernel facts kept until the store's generation
(or the kernel's result version) moves.  These tests pin down what moves it,
what must not (so the cache is worth having), and, as a property, that any
sequence of gate operations leaves every cached decision equal to one
computed from scratch.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmodgate.errors import UserError
from kmodgate.gate import facts as facts_module
from kmodgate.gate import policy
from kmodgate.gate.facts import DecisionCache
from kmodgate.gate.service import Gate
from kmodgate.gate.waivers import WaiverScope
from kmodgate.store.models import Result
from kmodgate.store.queries import latest_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gate_fixtures import DAY, T0, all_pass, make_gate, result

K50, K51, K52 = "6.1.0-50-amd64", "6.1.0-51-amd64", "6.1.0-52-amd64"
STREAMS = ("next", "testing", "stable")


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = make_gate(tmp_path)
    yield g
    g.close()


def fresh(gate: Gate, kernel: str, stream: str, now: datetime) -> dict[str, Any]:
    """The decision computed from the store, bypassing the cache."""
    with gate.store.read() as session:
        return policy.decide(session, gate.config, kernel, stream, now).to_json()


def counts(gate: Gate) -> tuple[int, int]:
    return gate.decision_cache.hits, gate.decision_cache.misses


def test_repeated_decisions_read_the_store_once(gate: Gate) -> None:
    all_pass(gate, K50)
    for stream in STREAMS * 3:
        gate.decide(K50, stream, now=T0)
    # one gathering serves every stream: the facts of a kernel are stream-free
    assert counts(gate) == (8, 1)


def test_a_waiver_flips_a_cached_decision(gate: Gate) -> None:
    all_pass(gate, K50)
    gate.record_results([result("zfs", K50, "build", "fail", version="2.0")], now=T0)
    assert not gate.decide(K50, "next", now=T0).allowed
    w = gate.waive(WaiverScope("zfs", K50, "build"), reason="known", author="a", now=T0)
    assert gate.decide(K50, "next", now=T0).allowed
    gate.revoke_waiver(w["id"], now=T0)
    assert not gate.decide(K50, "next", now=T0).allowed
    assert counts(gate) == (0, 3)


def test_promotions_and_pins_flip_cached_decisions(gate: Gate) -> None:
    all_pass(gate, K50)
    all_pass(gate, K51)
    assert gate.decide(K51, "next", now=T0).allowed
    gate.pin("next", K50, author="a", reason="hold", now=T0)
    pinned = gate.decide(K51, "next", now=T0)
    assert not pinned.allowed and pinned.pin is not None
    gate.unpin("next", author="a", now=T0)
    assert gate.decide(K51, "next", now=T0).allowed
    # testing needs three days in next: entering next starts the soak
    assert gate.decide(K51, "testing", now=T0 + 4 * DAY).soak["previous_stream"] == "next"
    assert not gate.decide(K51, "testing", now=T0 + 4 * DAY).allowed
    gate.promote(K51, "next", author="a", now=T0)
    assert gate.decide(K51, "testing", now=T0 + 4 * DAY).allowed


def test_results_on_one_kernel_keep_the_others_cached(gate: Gate) -> None:
    all_pass(gate, K50)
    all_pass(gate, K51)
    gate.decide(K50, "next", now=T0)
    gate.decide(K51, "next", now=T0)
    generation_before = gate.store.kernel_generation(K50)
    gate.record_results([result("zfs", K51, "build", "fail", version="2.0")], now=T0)
    assert gate.store.kernel_generation(K50) == generation_before
    assert gate.store.kernel_generation(K51).kernel_results > generation_before.kernel_results
    hits, misses = counts(gate)
    assert gate.decide(K50, "next", now=T0).allowed
    assert not gate.decide(K51, "next", now=T0).allowed
    assert counts(gate) == (hits + 1, misses + 1)


def test_an_error_replaced_in_place_renews_the_kernel(gate: Gate) -> None:
    all_pass(gate, K50, modules=("openrazer-driver",))
    gate.record_results([result("zfs", K50, "abi"),
                         result("zfs", K50, "build", "error",
                                reasons=[{"code": "apt", "message": "mirror down"}])], now=T0)
    assert not gate.decide(K50, "next", now=T0).allowed
    # the same inputs again: the error row is updated, not a new row inserted
    counted = gate.record_results([result("zfs", K50, "build")], now=T0)
    assert counted["replaced"] == 1
    assert gate.decide(K50, "next", now=T0).allowed


def test_a_learnt_package_version_renews_every_kernel(gate: Gate) -> None:
    all_pass(gate, K50)
    before = gate.store.kernel_generation(K52)
    gate.record_kernel(K50, package_version="6.1.50-1", now=T0)
    after = gate.store.kernel_generation(K52)
    assert after.state == before.state + 1  # kernels are read by the ordering of others
    assert gate.decision_cache.facts(K50, T0).kernel.package_version == "6.1.50-1"


def test_reads_leave_the_generation_alone(gate: Gate) -> None:
    all_pass(gate, K50)
    before = gate.store.kernel_generation(K50)
    gate.known_fingerprints("abi", ["zfs@1.0|6.1.0-50-amd64|abi"])  # in a write transaction
    gate.record_kernel(K50, now=T0)  # already known: nothing to write
    gate.status(now=T0)
    gate.decide(K50, "next", now=T0)
    assert gate.store.kernel_generation(K50) == before


def test_results_written_without_naming_their_kernel_renew_everything(gate: Gate) -> None:
    all_pass(gate, K50)
    gate.decide(K50, "next", now=T0)
    before = gate.store.kernel_generation(K50)
    with gate.store.transaction() as session:  # a write record_result did not note
        row = session.query(Result).filter_by(module="zfs", kind="build").one()
        row.outcome = "fail"
    after = gate.store.kernel_generation(K50)
    assert after == before._replace(results=before.results + 1)  # the state stays
    assert not gate.decide(K50, "next", now=T0).allowed


def test_a_rolled_back_transaction_changes_nothing(gate: Gate) -> None:
    all_pass(gate, K50)
    before = gate.store.kernel_generation(K50)
    with pytest.raises(UserError):
        gate.record_results([result("zfs", K50, "build", "fail", version="3"),
                             result("zfs", K50, "nonsense")], now=T0)
    with pytest.raises(RuntimeError), gate.store.transaction() as session:
        session.add(Result(module="zfs", module_version="9", kernel=K50, kind="abi",
                           outcome="fail", reasons=[], fingerprint="x", recorded_at=T0))
        raise RuntimeError("abandoned")
    assert gate.store.kernel_generation(K50) == before


def test_an_earlier_moment_is_never_answered_from_later_facts(gate: Gate) -> None:
    all_pass(gate, K50)
    gate.record_results([result("zfs", K50, "build", "fail", version="2.0")], now=T0)
    gate.waive(WaiverScope("zfs", K50, "build"), reason="r", author="a", duration=DAY,
               now=T0)
    # gathered after the waiver expired: the facts leave it out ...
    assert not gate.decide(K50, "next", now=T0 + 2 * DAY).allowed
    # ... so they cannot answer for a moment the waiver still covered
    assert gate.decide(K50, "next", now=T0 + DAY / 2).allowed
    assert gate.decide(K50, "next", now=T0 + 2 * DAY).to_json() == \
        fresh(gate, K50, "next", T0 + 2 * DAY)


def test_an_unknown_kernel_is_not_cached(gate: Gate) -> None:
    with pytest.raises(UserError, match="unknown kernel"):
        gate.decide(K50, "next", now=T0)
    all_pass(gate, K50)
    assert gate.decide(K50, "next", now=T0).allowed


def test_the_cache_keeps_its_size(gate: Gate) -> None:
    cache = DecisionCache(gate.config, gate.store, size=2)
    for kernel in (K50, K51, K52):
        all_pass(gate, kernel)
        cache.facts(kernel, T0)
    cache.facts(K52, T0)
    assert cache.hits == 1 and cache.misses == 3
    cache.facts(K50, T0)  # evicted, least recently used
    assert cache.misses == 4


def test_warming_gathers_the_newest_kernels_the_cache_holds(gate: Gate) -> None:
    cache = DecisionCache(gate.config, gate.store, size=2)
    for i, kernel in enumerate((K50, K51, K52)):
        all_pass(gate, kernel, now=T0 + i * DAY)
    assert cache.warm(T0 + 3 * DAY) == 2
    cache.facts(K52, T0 + 3 * DAY)
    cache.facts(K51, T0 + 3 * DAY)
    assert (cache.hits, cache.misses) == (2, 2)  # K52 and K51 were ready; K50 was not
    stop = threading.Event()
    stop.set()
    assert DecisionCache(gate.config, gate.store).warm(T0, stop) == 0


def test_concurrent_misses_on_one_kernel_read_once(gate: Gate,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    all_pass(gate, K50)
    cache = DecisionCache(gate.config, gate.store)
    real_results, real_state = facts_module.read_results, facts_module.read_state
    started, release = threading.Event(), threading.Event()
    read: list[str] = []

    def slow_results(*args: Any) -> Any:
        read.append(args[2])
        started.set()
        release.wait(timeout=10)
        return real_results(*args)

    def counted_state(*args: Any) -> Any:
        read.append("state")
        return real_state(*args)

    monkeypatch.setattr(facts_module, "read_results", slow_results)
    monkeypatch.setattr(facts_module, "read_state", counted_state)
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(cache.facts(K50, T0)))
    first.start()
    assert started.wait(timeout=10)
    others = [threading.Thread(target=lambda: answers.append(cache.facts(K50, T0)))
              for _ in range(4)]
    for t in others:
        t.start()
    time.sleep(0.2)  # the others are now waiting for the first reading
    release.set()
    for t in (first, *others):
        t.join(timeout=10)
    assert read == [K50, "state"]
    assert len(answers) == 5 and all(a == answers[0] for a in answers)
    assert cache.results_reads == 1


def test_a_waiver_renews_the_state_not_every_kernels_results(gate: Gate) -> None:
    for kernel in (K50, K51, K52):
        all_pass(gate, kernel)
        gate.decide(kernel, "next", now=T0)
    reads = gate.decision_cache.results_reads
    gate.waive(WaiverScope("zfs", K51, "build"), reason="known", author="a", now=T0)
    gate.record_results([result("zfs", K51, "build", "fail", version="2.0")], now=T0)
    assert gate.decide(K51, "next", now=T0).allowed  # waived: the new state is seen
    assert gate.decide(K50, "next", now=T0).allowed
    assert gate.decide(K52, "next", now=T0).allowed
    assert gate.decision_cache.results_reads == reads + 1  # K51's new result alone


def test_ties_in_recorded_time_resolve_to_the_last_recorded(gate: Gate) -> None:
    gate.record_results([result("zfs", K50, "build", "fail", version="1")], now=T0)
    gate.record_results([result("zfs", K50, "build", "pass", version="2")], now=T0)
    with gate.store.read() as session:
        latest = latest_results(session, modules=["zfs"], kernels=[K50], kinds=["build"])
    assert [r.outcome for r in latest.values()] == ["pass"]
    assert fresh(gate, K50, "next", T0)["satisfied"] == \
        gate.decide(K50, "next", now=T0).to_json()["satisfied"]


# Any sequence of operations: cached decisions equal fresh ones.

KERNELS = (K50, K51, K52)
MODULES = ("openrazer-driver", "zfs", "v4l2loopback")
OUTCOMES = ("pass", "fail", "error")

operations = st.one_of(
    st.tuples(st.just("result"), st.sampled_from(MODULES), st.sampled_from(KERNELS),
              st.sampled_from(("abi", "build")), st.sampled_from(OUTCOMES),
              st.sampled_from(("1", "2"))),
    st.tuples(st.just("waive"), st.sampled_from(MODULES), st.sampled_from(KERNELS),
              st.integers(1, 3)),
    st.tuples(st.just("revoke"), st.integers(1, 4)),
    st.tuples(st.just("promote"), st.sampled_from(KERNELS), st.sampled_from(STREAMS)),
    st.tuples(st.just("pin"), st.sampled_from(STREAMS), st.sampled_from(KERNELS)),
    st.tuples(st.just("unpin"), st.sampled_from(STREAMS)),
    st.tuples(st.just("version"), st.sampled_from(KERNELS), st.sampled_from(("a", "b"))),
    st.tuples(st.just("wait"), st.integers(0, 3)),
)


def apply(gate: Gate, op: tuple[Any, ...], now: datetime) -> datetime:
    match op:
        case ("result", module, kernel, kind, outcome, version):
            gate.record_results([result(module, kernel, kind, outcome, version=version)],
                                now=now)
        case ("waive", module, kernel, days):
            gate.waive(WaiverScope(module, kernel, "*"), reason="r", author="a",
                       duration=days * DAY, now=now)
        case ("revoke", waiver_id):
            gate.revoke_waiver(waiver_id, now=now)
        case ("promote", kernel, stream):
            gate.promote(kernel, stream, author="a", force=True, reason="r", now=now)
        case ("pin", stream, kernel):
            gate.pin(stream, kernel, author="a", reason="r", now=now)
        case ("unpin", stream):
            gate.unpin(stream, author="a", now=now)
        case ("version", kernel, version):
            gate.record_kernel(kernel, package_version=f"6.1.{kernel[6:8]}-{version}", now=now)
        case ("wait", days):
            return now + days * DAY
    return now


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operations, min_size=1, max_size=12))
def test_cached_decisions_equal_fresh_ones(tmp_path_factory: pytest.TempPathFactory,
                                           ops: list[tuple[Any, ...]]) -> None:
    gate = make_gate(tmp_path_factory.mktemp("cache"))
    try:
        for kernel in KERNELS:
            gate.record_kernel(kernel, now=T0)
        now = T0
        for op in ops:
            # A refused change (an unknown waiver, nothing pinned) leaves the store as it was.
            with contextlib.suppress(UserError):
                now = apply(gate, op, now)
            for kernel in KERNELS:
                for stream in STREAMS:
                    assert gate.decide(kernel, stream, now=now).to_json() == \
                        fresh(gate, kernel, stream, now), (op, kernel, stream)
        assert gate.decision_cache.hits > 0
    finally:
        gate.close()
