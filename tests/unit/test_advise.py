"""The advisor on a history small enough to compute every figure by hand.

Line 6.1/amd64, three kernels K1 < K2 < K3:

    symbol         K1     K2     K3       churn (changes/updates, last)
    module_layout  0x1    0x2    0x3      2/2, K3
    a              0xA    0xA    0xA      0/2
    b              0xB1   0xB2   0xB2     1/2, K2
    c              0xC    0xC    --       1/2, K3 (removed)
    d (GPL)        0xD    0xD    0xD      0/2

Modules built for K1: m1 uses a b, m2 uses a c, m3 uses a b d.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from advise_fixtures import GOLDEN, RELEASES, kernels, modules, write_corpus
from gate_fixtures import make_config
from kmodgate.abi.stablelist import format_stablelist, parse_stablelist
from kmodgate.advise.advice import advise
from kmodgate.advise.churn import line_churn, subsystem
from kmodgate.advise.usage import propose_stablelist
from kmodgate.gate.service import Gate
from kmodgate.web.app import create_app
from kmodgate.web.pages import FIGURE_POLICY
from kmodgate.web.settings import WebSettings
from web_fixtures import live_server

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))

def test_churn_counts_changes_and_removals_per_update() -> None:
    lc = line_churn("6.1/amd64", kernels())
    got = {s: (r.changes, r.updates, r.last_change) for s, r in lc.symbols.items()}
    assert got == {
        "module_layout": (2, 2, RELEASES[2]),
        "a": (0, 2, None),
        "b": (1, 2, RELEASES[1]),
        "c": (1, 2, RELEASES[2]),
        "d": (0, 2, None),
    }
    assert lc.changed_per_update == [2, 2]  # {module_layout, b}, {module_layout, c}
    assert lc.subsystem_changes(kernels()[-1]) == {"vmlinux": 4}
    assert subsystem("drivers/usb/core/usbcore") == "drivers/usb"


def test_ranking_puts_wide_use_first_then_low_churn() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    assert [(u.rank, u.symbol, len(u.modules)) for u in a.usage] == [
        (1, "a", 3), (2, "b", 2), (3, "d", 1), (4, "c", 1)]
    by_symbol = {u.symbol: u for u in a.usage}
    assert by_symbol["c"].why == ("used by 1 of 3 modules; CRC changed in 1 of 2 updates of "
                                  "6.1/amd64 (last in 6.1.0-3-amd64)")
    assert by_symbol["a"].why == "used by 3 of 3 modules; stable across 2 updates of 6.1/amd64"
    # c is gone from K3 yet still counted, with its last known export.
    assert by_symbol["c"].provider == "vmlinux"
    assert by_symbol["d"].export_type == "EXPORT_SYMBOL_GPL"


def test_proposal_takes_the_fewest_top_symbols_reaching_the_target() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    # 7 uses: a 3, b 2, d 1, c 1.  a alone covers 3/7 < 0.7; a + b cover 5/7.
    assert a.proposal == ["a", "b"]
    assert a.proposal_coverage == 5 / 7
    assert propose_stablelist(a.usage, 1.0) == (["a", "b", "c", "d"], 1.0)


def test_already_listed_symbols_count_and_are_not_proposed_again() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7, stablelist=frozenset({"a"}))
    assert a.proposal == ["b"]
    assert a.kept == {"a", "b"}
    coverage = {c.module: (c.used, c.covered, c.uncovered) for c in a.coverage}
    assert coverage == {"m1": (2, 1, ["b"]), "m2": (2, 1, ["c"]), "m3": (3, 1, ["b", "d"])}
    assert [c.module for c in a.coverage] == ["m3", "m1", "m2"]  # least covered first


def test_survival_and_what_if_curves() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    assert a.base == RELEASES[0]  # all three load there, none elsewhere
    assert [(p.release, p.loading, p.loading_if_kept) for p in a.survival] == [
        # K2: module_layout changed for all; b changed too, but b is kept.
        # K3: m2 also lost c, which the proposal does not keep.
        (RELEASES[0], 3, 3), (RELEASES[1], 0, 3), (RELEASES[2], 0, 2)]
    later = advise(kernels(), modules(), coverage_target=0.7, base=RELEASES[1])
    assert [p.release for p in later.survival] == RELEASES[1:]


def advise_command(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """kmodgate advise on the corpus, with "a" already on the stablelist in force."""
    listed = tmp_path / "kabi_stablelist_x86_64"
    listed.write_text(format_stablelist("rhel9_x86_64_stablelist", ["a"]))
    return subprocess.run(
        [KMODGATE, "advise", "--format", "stablelist", "--coverage", "0.7",
         "--stablelist", str(listed), *write_corpus(tmp_path), *extra],
        capture_output=True, text=True, check=True)


def test_stablelist_output_through_the_command_matches_the_golden_file(tmp_path: Path) -> None:
    proc = advise_command(tmp_path)
    golden = GOLDEN / "advise_proposal_stablelist"
    assert proc.stdout == golden.read_text()
    assert parse_stablelist(proc.stdout, "out").symbols == {"a", "b"}


def test_plots_are_written_as_png_and_svg(tmp_path: Path) -> None:
    advise_command(tmp_path, "--plots", str(tmp_path / "plots"))
    for name in ("survival", "churn"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n")
        assert "<svg" in (tmp_path / "plots" / f"{name}.svg").read_text()


def test_recorded_advice_is_on_the_dashboard(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    gate = Gate.open(config)
    try:
        with live_server(create_app(gate, WebSettings())) as base, \
                httpx.Client(base_url=base) as web:
            assert "No advice recorded yet" in web.get("/advice").text
            assert web.get("/api/v1/advice/1").status_code == 404

            proc = advise_command(tmp_path, "--record", "--config", str(tmp_path / "kmodgate.toml"))
            assert "recorded as report 1" in proc.stderr
            assert proc.stdout == (GOLDEN / "advise_proposal_stablelist").read_text()

            listing = web.get("/api/v1/advice").json()
            assert listing["total"] == 1 and listing["items"][0]["base"] == RELEASES[0]
            report = web.get("/api/v1/advice/1").json()
            assert [(p["kernel"], p["loading"], p["loading_if_kept"])
                    for p in report["report"]["survival"]] == [
                (RELEASES[0], 3, 3), (RELEASES[1], 0, 3), (RELEASES[2], 0, 2)]
            assert report["report"]["proposal"]["symbols"] == ["b"]
            assert report["stablelist"] == proc.stdout

            page = web.get("/advice")
            assert page.status_code == 200
            assert "3 modules built for" in page.text and "0 of 3 (0%)" in page.text
            assert 'id="coverage"' in page.text  # "a" was listed: coverage is worth a table
            assert 'src="/advice/1/survival.svg"' in page.text

            figure = web.get("/advice/1/survival.svg")
            assert figure.headers["content-type"] == "image/svg+xml"
            assert figure.headers["content-security-policy"] == FIGURE_POLICY
            assert "<svg" in figure.text and RELEASES[1] in figure.text
            download = web.get("/advice/1/stablelist")
            assert download.text == proc.stdout
            assert "attachment" in download.headers["content-disposition"]

            # Only the store's figures, by name; unknown reports are 404s.
            assert web.get("/advice/2/survival.svg").status_code == 404
            assert web.get("/advice?report=2").status_code == 404
            assert web.get("/advice/1/..%2f..%2fkmodgate.toml.svg").status_code in (404, 422)
            assert web.get("/advice/1/kmodgate.svg").status_code == 422
    finally:
        gate.close()


def test_record_with_a_missing_configuration_fails_first_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    proc = subprocess.run([KMODGATE, "advise", "--record", "--config", str(missing),
                           "--plots", str(tmp_path / "plots"), *write_corpus(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"kmodgate: error: {missing}: no such configuration "
                                        "file"]
    assert not (tmp_path / "plots").exists()  # it stopped before any work


def test_the_stored_report_keeps_what_a_page_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    from kmodgate.advise import record

    monkeypatch.setattr(record, "TOP", 2)
    monkeypatch.setattr(record, "NAMES", 1)
    a = advise(kernels(), modules(), coverage_target=0.7, stablelist=frozenset({"a"}))
    report = record.stored_report(a)
    assert [(s["symbol"], s["users"], s["modules"]) for s in report["symbols"]] == [
        ("a", 3, ["m1"]), ("b", 2, ["m1"])]
    assert [(c["module"], c["uncovered"]) for c in report["coverage"]] == [
        ("m3", ["b"]), ("m1", ["b"])]
    assert report["coverage_total"] == 3 and report["stablelist_in_force"]
    assert not record.stored_report(advise(kernels(), modules()))["stablelist_in_force"]
