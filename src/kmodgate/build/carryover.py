"""The kABI-tracking carry-over question: does the module built for kernel A
load on kernel B?  The build check keeps every built .ko (content-addressed);
this runs the abi check over them against other kernels."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from kmodgate.abi.compare import Outcome, check_module, companion_exports
from kmodgate.abi.model import KernelABI
from kmodgate.results import CheckResult
from kmodgate.sources.modules import read_module_file


def kernel_abi_identity(kernel: KernelABI) -> str:
    """A hash of everything the abi check reads from a kernel."""
    h = hashlib.sha256()
    h.update(f"{kernel.release}\0{kernel.vermagic}\0{kernel.machine}\0"
             f"{kernel.modversions}\0{kernel.force_load}\n".encode())
    for symbol in sorted(kernel.exports):
        e = kernel.exports[symbol]
        h.update(f"{symbol}\0{e.crc}\0{e.provider}\0{e.export_type.value}\0"
                 f"{e.namespace}\n".encode())
    return h.hexdigest()


def carryover(builds: Sequence[CheckResult], kernels: Sequence[KernelABI]) -> Iterator[CheckResult]:
    """For every build that produced modules, their abi verdict on every kernel.

    One result per (build, kernel): the package's modules are loaded together,
    so they may use each other's exports; it fails if any of them fails.
    """
    identities = {k.release: kernel_abi_identity(k) for k in kernels}
    for build in builds:
        if build.outcome is not Outcome.PASS or not build.artifacts:
            continue
        modules = [read_module_file(Path(a)) for a in build.artifacts]
        extra = companion_exports(modules)
        for kernel in kernels:
            verdicts = [check_module(m, kernel, extra) for m in modules]
            failed = any(v.outcome is Outcome.FAIL for v in verdicts)
            digest = hashlib.sha256(
                f"abi\0{build.fingerprint}\0{identities[kernel.release]}".encode()
            ).hexdigest()
            yield CheckResult(
                module=build.module,
                module_version=build.module_version,
                kernel=kernel.release,
                kind="abi",
                outcome=Outcome.FAIL if failed else Outcome.PASS,
                reasons=[{**r.to_json(), "binary": v.module.name}
                         for v in verdicts for r in v.reasons],
                fingerprint=digest,
                reproducer=" ".join(
                    ["kmodgate check --kind abi", f"--kernel {kernel.origin}",
                     *(f"--module {a}" for a in build.artifacts)]),
                details={"built_for": build.kernel,
                         "binaries": {v.module.name: v.module.path for v in verdicts}},
            )
