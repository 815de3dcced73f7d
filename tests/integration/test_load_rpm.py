"""The load check on a kernel RPM, laid out as Fedora ships one
(lib/modules/<release>/vmlinuz beside the modules), built with rpmbuild from a
real Debian kernel image: the reference names the package, kmodgate unpacks
it, boots it under QEMU and loads modules of the same build."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.abi.compare import Outcome
from kmodgate.boot.kernel_image import load_kernel_image
from kmodgate.boot.loadcheck import run_load_checks
from kmodgate.sources import debian
from rpm_fixtures import RpmRecipe, build_rpm

pytestmark = pytest.mark.integration

# Small in-tree modules without dependencies.
MODULES = ("dummy", "tun")


def test_a_kernel_rpm_boots_and_loads_its_own_modules(tmp_path: Path) -> None:
    require_tool("rpmbuild")
    require_tool("qemu-system-x86_64")
    release = next(r for r in reversed(debian.available_kernel_releases("amd64"))
                   if r.startswith("6.1."))
    image = load_kernel_image(f"debian:{release}")
    files = {f"/lib/modules/{release}/vmlinuz": image.vmlinuz.read_bytes()}
    for name in MODULES:
        source = image.module_files[name]
        relative = source.relative_to(image.modules_dir)
        files[f"/lib/modules/{release}/{relative}"] = source.read_bytes()
    package = build_rpm(RpmRecipe(name="kernel-core", version=release.split("-")[0],
                                  files=files),
                        tmp_path)

    from_rpm = load_kernel_image(str(package))
    assert from_rpm.release == release
    paths = [image.module_files[name] for name in MODULES]
    results = run_load_checks(str(package), paths, timeout=180)
    assert [(r.module, r.kernel, r.kind, r.outcome) for r in results] == [
        (name, release, "load", Outcome.PASS) for name in MODULES]
