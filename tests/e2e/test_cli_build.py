"""`kmodgate check` on module sources through the installed command: the build
matrix and the carry-over question, on real archive packages."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodgate.sources.kernels import expand_kernel_refs, load_kernel

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))


def run_json(*args: str, expect: int) -> Any:
    proc = subprocess.run([KMODGATE, *args, "--json"], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == expect, proc.stderr
    assert proc.stderr == "" or "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def two_abis() -> tuple[str, str]:
    """The oldest and newest 6.1 amd64 kernels, if their module_layout differs."""
    refs = expand_kernel_refs(["debian-line:6.1/amd64"])
    old, new = refs[0], refs[-1]
    if load_kernel(old).exports["module_layout"] == load_kernel(new).exports["module_layout"]:
        pytest.skip("the archive's 6.1 kernels share one module_layout CRC today")
    return old, new


def test_build_matrix_json_follows_the_abi_contract(two_abis: tuple[str, str]) -> None:
    old, new = two_abis
    data = run_json("check", "--kind", "build", "--kernel", old, "--kernel", new,
                    "--module", "debian:acpi-call-dkms", expect=0)
    assert [(r["module"], r["kernel"], r["kind"], r["outcome"]) for r in data["results"]] == [
        ("acpi-call", old.removeprefix("debian:"), "build", "pass"),
        ("acpi-call", new.removeprefix("debian:"), "build", "pass")]
    for r in data["results"]:
        assert r["toolchain"] and r["reproducer"] and r["artifacts"]
        assert all(Path(a).is_file() for a in r["artifacts"])
    # The reproducer is a command a maintainer can run as printed.
    command = shlex.split(data["results"][1]["reproducer"])
    assert command[0] == "kmodgate"
    again = run_json(*command[1:], expect=0)
    assert [(r["kernel"], r["outcome"]) for r in again["results"]] == [
        (new.removeprefix("debian:"), "pass")]


def test_binaries_built_for_one_abi_are_checked_against_the_others(
    two_abis: tuple[str, str]
) -> None:
    old, new = two_abis
    data = run_json("check", "--kind", "abi", "--kernel", old, "--kernel", new,
                    "--module", "debian:acpi-call-dkms", expect=1)
    cells = {(r["details"]["built_for"], r["kernel"]): r for r in data["results"]}
    o, n = old.removeprefix("debian:"), new.removeprefix("debian:")
    assert {k: r["outcome"] for k, r in cells.items()} == {
        (o, o): "pass", (o, n): "fail", (n, o): "fail", (n, n): "pass"}
    assert cells[(o, n)]["reasons"][0]["code"] == "module_layout_mismatch"


def test_a_binary_reference_is_refused_for_the_build_kind(tmp_path: Path) -> None:
    proc = subprocess.run([KMODGATE, "check", "--kind", "build", "--kernel", "debian:x",
                           "--module", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kmodgate: error:") and "not a module source" in proc.stderr
