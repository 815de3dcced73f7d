"""The installed kmodgate command on real archive data: JSON contracts and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodgate.abi.stablelist import format_stablelist
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.modules import load_module_ref

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KMODGATE, *args], capture_output=True, text=True, timeout=600)


def run_json(*args: str, expect: int) -> Any:
    proc = run(*args, "--json")
    assert proc.returncode == expect, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def releases() -> tuple[str, str]:
    """The oldest and newest 6.1 amd64 releases whose module_layout differs."""
    found = [r for r in debian.available_kernel_releases("amd64")
             if r.startswith("6.1.") and "-rt-" not in r and "-cloud-" not in r]
    if len(found) < 2:
        pytest.skip("the archive offers fewer than two 6.1 amd64 kernels today")
    return found[0], found[-1]


@pytest.fixture(scope="module")
def usbcore(releases: tuple[str, str]) -> str:
    """A real in-tree module of the newest kernel with exports, depends and many CRCs."""
    modules = load_module_ref(f"debian-image:{releases[1]}")
    return next(m.path for m in modules if m.name == "usbcore")


def test_kernels_available_lists_archive_releases(releases: tuple[str, str]) -> None:
    data = run_json("kernels", "--available", "--flavour", "amd64", expect=0)
    refs = [k["ref"] for k in data["kernels"]]
    assert f"debian:{releases[0]}" in refs and f"debian:{releases[1]}" in refs


def test_inspect_module_json_contract(usbcore: str) -> None:
    data = run_json("inspect", "module", usbcore, expect=0)
    (m,) = data["modules"]
    assert m["name"] == "usbcore"
    assert m["path"] == usbcore
    assert m["vermagic"].endswith("SMP preempt mod_unload modversions ")
    assert m["license"] == "GPL"
    assert m["depends"] == ["usb-common"]
    dump = subprocess.run(["modprobe", "--dump-modversions", usbcore], capture_output=True,
                          text=True, check=True).stdout
    assert [f"{v['crc']}\t{v['symbol']}" for v in m["versions"]] == dump.splitlines()


def test_check_json_contract_and_exit_codes(releases: tuple[str, str], usbcore: str) -> None:
    old, new = releases
    data = run_json("check", "--kind", "abi", "--kernel", f"debian:{new}", "--module", usbcore,
                    expect=0)
    (result,) = data["results"]
    assert result | {"reasons": []} == result  # the contract's keys are all there
    assert (result["module"], result["kernel"], result["kind"], result["outcome"]) == (
        "usbcore", new, "abi", "pass")

    data = run_json("check", "--kind", "abi", "--kernel", f"debian:{old}",
                    "--kernel", f"debian:{new}", "--module", usbcore, expect=1)
    outcomes = {r["kernel"]: r["outcome"] for r in data["results"]}
    assert outcomes == {old: "fail", new: "pass"}
    failing = next(r for r in data["results"] if r["kernel"] == old)
    assert failing["reasons"][0]["code"] == "module_layout_mismatch"
    assert "cannot load on this kernel at all" in failing["reasons"][0]["message"]
    assert any(r["code"] == "crc_mismatch" and r["required_crc"].startswith("0x")
               for r in failing["reasons"])


def test_human_output_gives_the_survival_figure(releases: tuple[str, str], usbcore: str) -> None:
    old, new = releases
    proc = run("check", "--kernel", f"debian:{old}", "--kernel", f"debian:{new}",
               "--module", usbcore)
    assert proc.returncode == 1
    assert f"on {new}: 1 of 1 modules load" in proc.stdout
    assert f"on {old}: 0 of 1 modules load" in proc.stdout


def test_diff_with_stablelist_exits_1_only_when_a_listed_symbol_changed(
    releases: tuple[str, str], tmp_path: Path, usbcore: str
) -> None:
    old, new = releases
    a, b = load_kernel(f"debian:{old}"), load_kernel(f"debian:{new}")
    changed = sorted(s for s in a.exports.keys() & b.exports.keys()
                     if a.exports[s].crc != b.exports[s].crc)[:3]
    stable = sorted(s for s in a.exports.keys() & b.exports.keys()
                    if a.exports[s] == b.exports[s])[:3]
    assert changed and stable

    listed = tmp_path / "kabi_stablelist_x86_64"
    listed.write_text(format_stablelist("test_x86_64_stablelist", stable + changed))
    data = run_json("diff", f"debian:{old}", f"debian:{new}", "--stablelist", str(listed),
                    expect=1)
    assert sorted(c["symbol"] for c in data["stablelisted_changes"]) == changed
    assert data["counts"]["crc_changed"] > 1000

    listed.write_text(format_stablelist("test_x86_64_stablelist", stable))
    data = run_json("diff", f"debian:{old}", f"debian:{new}", "--stablelist", str(listed),
                    expect=0)
    assert data["stablelisted_changes"] == []

    # The impact on a module built for the new kernel, seen from the old one.
    data = run_json("diff", f"debian:{new}", f"debian:{old}", "--module", usbcore, expect=1)
    (impact,) = data["impact"]
    assert (impact["old_outcome"], impact["new_outcome"]) == ("pass", "fail")
    assert impact["breaking_symbols"]
