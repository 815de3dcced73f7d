"""kmodgate sync: discover kernels and module versions, run the missing checks,
record them, and tell people what changed.

Resumable by construction: every result is recorded in its own transaction
the moment it is known, builds are cached by their inputs' fingerprint, and
the store keeps each (fingerprint, kind) once.  A sync killed at any point
and run again ends with the same store as one that was never interrupted.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kmodgate.abi.model import KernelABI
from kmodgate.boot.grouping import load_builds
from kmodgate.build.carryover import carryover, group_abi_result, kernel_abi_identity
from kmodgate.build.matrix import run_build_matrix
from kmodgate.config import Config, ModuleConfig, SourceConfig
from kmodgate.errors import UserError
from kmodgate.gate.service import Gate
from kmodgate.results import CheckResult
from kmodgate.sources import debian
from kmodgate.sources.kernels import DEBIAN_PREFIX, load_kernel
from kmodgate.sources.module_sources import is_source_ref
from kmodgate.sources.modules import load_module_ref

# The check kinds sync can run; load only for module sources (it boots the
# binaries the build check made for each kernel).
RUNNABLE_KINDS = frozenset({"abi", "build", "load"})


@dataclass(frozen=True, slots=True)
class KernelBuild:
    ref: str  # what the check engines are given
    release: str
    source: SourceConfig
    package_version: str | None = None


@dataclass(slots=True)
class SyncReport:
    kernels: list[str] = field(default_factory=list)
    results: Counter[str] = field(default_factory=Counter)  # new / unchanged / replaced
    outcomes: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    delivered: int = 0
    failed_deliveries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "results": dict(self.results),
                "outcomes": dict(self.outcomes), "events": self.events,
                "delivered": self.delivered, "failed_deliveries": self.failed_deliveries}


def discover_kernels(config: Config) -> list[KernelBuild]:
    """Every kernel build the configured sources offer now."""
    found: list[KernelBuild] = []
    for source in config.sources:
        if source.type == "debian":
            releases = [r for r in debian.available_kernel_releases(source.flavour)
                        if fnmatch.fnmatchcase(r, source.pattern)]
            versions = debian.package_versions([f"linux-headers-{r}" for r in releases])
            found.extend(KernelBuild(DEBIAN_PREFIX + r, r, source,
                                     versions.get(f"linux-headers-{r}")) for r in releases)
        elif source.type == "directory":
            root = source.path
            if root is None or not root.is_dir():
                raise UserError(f"source {source.name}: no such directory", where=root)
            for tree in sorted(p for p in root.iterdir()
                               if p.is_dir() and fnmatch.fnmatchcase(p.name, source.pattern)):
                found.append(KernelBuild(str(tree), load_kernel(str(tree)).release, source))
        elif source.type == "rpm":
            found.extend(_rpm_kernels(source))
    return found


def _rpm_kernels(source: SourceConfig) -> list[KernelBuild]:
    """A local RPM repository (a path or file:// URL): its kernel-devel-like packages."""
    location = source.baseurl or ""
    root = Path(location.removeprefix("file://"))
    if not root.is_dir():
        raise UserError(f"source {source.name}: only local RPM repositories (a path or "
                        "file:// URL) are read", where=location)
    out = []
    for rpm_path in sorted(root.rglob(f"{source.package}-*.rpm")):
        if fnmatch.fnmatchcase(rpm_path.name, source.pattern) or source.pattern == "*":
            out.append(KernelBuild(str(rpm_path), load_kernel(str(rpm_path)).release, source))
    return out


def kinds_wanted(config: Config) -> set[str]:
    wanted = {k for s in config.streams for k in s.policy.kinds} or {"abi"}
    return wanted & RUNNABLE_KINDS


def sync(
    gate: Gate,
    *,
    jobs: int | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> SyncReport:
    """One pass: kernels, checks still missing, events, deliveries."""
    config = gate.config
    report = SyncReport()
    kernels = discover_kernels(config)
    for k in kernels:
        gate.record_kernel(k.release, source=k.source, package_version=k.package_version)
    report.kernels = [k.release for k in kernels]
    if not kernels or not config.modules:
        report.events = gate.emit_events()
        return report
    kinds = kinds_wanted(config)

    def record(result: CheckResult) -> None:
        # One transaction per result: a sync killed now loses nothing recorded.
        for status, n in gate.record_results([result]).items():
            report.results[status] += n
        report.outcomes[f"{result.kind}:{result.outcome.value}"] += 1
        if on_result is not None:
            on_result(result)

    sources = [m for m in config.modules.values() if is_source_ref(m.source)]
    binaries = [m for m in config.modules.values() if not is_source_ref(m.source)]
    abis: dict[str, KernelABI] = {}
    if "abi" in kinds:
        abis = {k.release: load_kernel(k.ref) for k in kernels}
    if sources:
        _sync_sources(sources, kernels, kinds, abis, jobs, record)
    if binaries and "abi" in kinds:
        _sync_binaries(binaries, list(abis.values()), record)
    report.events = gate.emit_events()
    delivery = gate.deliver()
    report.delivered, report.failed_deliveries = delivery.delivered, delivery.failed
    return report


def _sync_sources(modules: list[ModuleConfig], kernels: list[KernelBuild], kinds: set[str],
                  abis: dict[str, KernelABI], jobs: int | None,
                  record: Callable[[CheckResult], None]) -> None:
    """Build every source on every kernel; the binaries built for a kernel are then
    abi-checked on it (a module that builds but cannot load is caught here)."""
    name_of = {m.source: m.name for m in modules}

    def named(result: CheckResult) -> CheckResult:
        # Results carry the configuration's name: the gate, waivers and
        # notifications know the module by it, not by its PACKAGE_NAME.
        return replace(result, module=name_of.get(result.details.get("source", ""),
                                                  result.module))

    builds: list[CheckResult] = []

    def built(result: CheckResult) -> None:
        result = named(result)
        builds.append(result)
        if "build" in kinds:
            record(result)

    run_build_matrix([k.ref for k in kernels], list(name_of), jobs=jobs, on_result=built)
    if "abi" in kinds:
        for result in carryover(builds, list(abis.values()), same_kernel_only=True):
            record(result)
    if "load" in kinds:
        for k in kernels:  # one boot per kernel for every module built for it
            for result in load_builds(k.ref, [b for b in builds if b.kernel == k.release]):
                record(result)


def _sync_binaries(modules: list[ModuleConfig], kernels: list[KernelABI],
                   record: Callable[[CheckResult], None]) -> None:
    identities = {k.release: kernel_abi_identity(k) for k in kernels}
    for m in modules:
        group = load_module_ref(m.source)
        digests = sorted(b.sha256 or b.path for b in group)
        seed = hashlib.sha256("\0".join(digests).encode()).hexdigest()
        version = seed[:12]
        for kernel in kernels:
            record(group_abi_result(m.name, version, group, kernel,
                                    kernel_identity=identities[kernel.release], seed=seed,
                                    details={"source": m.source}))
