"""`kmodgate check --kind load` through the installed command: a real kernel
from the archive booted under QEMU, the kernel's verdict, and its agreement
with the abi check's prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from kmodgate.sources.kernels import expand_kernel_refs
from kmodgate.sources.modules import load_module_ref

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))


def run_json(*args: str, expect: int) -> Any:
    proc = subprocess.run([KMODGATE, *args, "--json"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == expect, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def kernels() -> tuple[str, str]:
    require_tool("qemu-system-x86_64")
    refs = expand_kernel_refs(["debian-line:6.1/amd64"])
    return refs[0], refs[-1]


def test_a_dkms_source_is_built_then_loaded_on_its_kernel(kernels: tuple[str, str]) -> None:
    _, newest = kernels
    data = run_json("check", "--kind", "load", "--kernel", newest,
                    "--module", "debian:acpi-call-dkms", expect=0)
    [result] = data["results"]
    assert (result["module"], result["kind"], result["outcome"]) == ("acpi-call", "load", "pass")
    assert result["details"]["binaries"] == {"acpi_call": "pass"}


def test_binaries_of_another_abi_are_refused_as_the_abi_check_predicts(
    kernels: tuple[str, str]
) -> None:
    oldest, newest = kernels
    image = load_module_ref(f"debian-image:{oldest.removeprefix('debian:')}")
    # A few small in-tree modules with no dependencies, built for the oldest ABI.
    picked = [m.path for m in image if not m.depends and m.name in
              {"dummy", "tun", "loop", "nbd", "veth"}][:3]
    assert picked
    args = [a for p in picked for a in ("--module", p)]
    data = run_json("check", "--kind", "load", "--kernel", oldest, "--kernel", newest,
                    *args, "--compare-abi", expect=1)
    outcomes = {(r["kernel"], r["outcome"]) for r in data["results"]}
    assert outcomes == {(oldest.removeprefix("debian:"), "pass"),
                        (newest.removeprefix("debian:"), "fail")}
    refused = [r for r in data["results"] if r["outcome"] == "fail"]
    assert all(r["reasons"][0]["code"] == "module_layout_mismatch" for r in refused)
    report = data["agreement"]
    assert (report["compared"], report["agree"], report["disagree"]) == (
        2 * len(picked), 2 * len(picked), 0)
    assert report["disagreements"] == []
