#!/usr/bin/env python3
"""The build matrix against a serial loop of Debian's own ``dkms build``.

Four -dkms packages x four kernels (the earliest and latest 6.1 ABI, the two
newest 6.12) are built three ways and the ratios printed (not asserted), each
beside the issue's floor:

1. a serial loop of ``dkms build``, one cell after the other, each with
   dkms's default ``-j<cores>`` -- what a distribution runs today;
2. kmodgate's first run (no cached results): cells in parallel, sharing the
   cores with make -j;
3. kmodgate's second run on unchanged inputs (every cell from the cache).

"Compile CPU time" is the user + system CPU time of each cell's build
sandbox -- make and everything it runs (gcc, ld, modpost, pahole) -- as the
kernel's rusage of the reaped process tree reports it.  It leaves out what
kmodgate spends around the compile: evaluating dkms.conf (in a sandbox of its
own), copying the source, starting the build sandbox's mounts, storing
results.  The first run's wall time is compared with that CPU time divided
by the cores: how close to the machine's capacity the matrix ran.

The machine may be shared.  Printed with the figures: the load average, and
the CPU time other processes used during each timed phase (from /proc/stat,
minus this process and its children), since a busy machine slows a run that
wants both cores more than a serial loop that wants one.  Downloads and
unpacking are warmed up first and not timed: both sides need them.  Results
go to a fresh cache directory; downloads are shared with the normal cache.

Run: .venv/bin/python benchmarks/build_matrix.py
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("v4l2loopback-dkms", "acpi-call-dkms", "openrazer-driver-dkms", "dm-writeboost-dkms")
PLAIN_FLAVOUR = re.compile(r"^\d+\.\d+\.\d+(?:-\d+)?(?:\+deb\d+)?-amd64$")


@dataclass
class Timed:
    wall: float  # seconds
    ours: float  # CPU seconds of this process and its children
    others: float  # CPU seconds the rest of the machine used meanwhile
    load: str  # load averages at the end


def machine_busy() -> float:
    """CPU seconds all processes have used since boot (/proc/stat, not idle or iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(what: Callable[[], object]) -> Timed:
    busy, ours, start = machine_busy(), own_cpu(), time.perf_counter()
    what()
    wall = time.perf_counter() - start
    ours = own_cpu() - ours
    others = max(0.0, machine_busy() - busy - ours)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return Timed(wall, ours, others, load)


def fresh_cache() -> Path:
    """A new cache directory sharing only the downloads of the normal one."""
    from kmodgate.cache import cache_dir

    shared = cache_dir()
    fresh = Path(tempfile.mkdtemp(prefix="kmodgate-bench-"))
    for name in ("debs", "unpacked"):
        (shared / name).mkdir(exist_ok=True)
        (fresh / name).symlink_to(shared / name)
    os.environ["KMODGATE_CACHE_DIR"] = str(fresh)
    return fresh


def pick_kernels() -> list[str]:
    from kmodgate.sources import debian

    releases = [r for r in debian.available_kernel_releases("amd64") if PLAIN_FLAVOUR.match(r)]
    s61 = [r for r in releases if r.startswith("6.1.0-")]
    s612 = [r for r in releases if r.startswith("6.12.")]
    return [s61[0], s61[-1], *s612[-2:]]


def dkms_build(source_tree: Path, name: str, version: str, kernel_ref: str) -> float:
    """Wall seconds of one ``dkms build`` of the source for the kernel, in the sandbox."""
    from kmodgate.build.kernel_tree import stage_kernel_tree
    from kmodgate.build.sandbox import Limits, run_sandboxed
    from kmodgate.cache import cache_subdir

    kernel = stage_kernel_tree(kernel_ref)
    work = Path(tempfile.mkdtemp(prefix="dkms-", dir=cache_subdir("build-work")))
    (work / "dkms").mkdir()
    shutil.copytree(source_tree, work / "src" / f"{name}-{version}", symlinks=True)
    start = time.perf_counter()
    run_sandboxed(
        ["dkms", "build", "-m", name, "-v", version, "-k", kernel.release,
         "--dkmstree", str(work / "dkms"), "--sourcetree", str(work / "src"),
         "--kernelsourcedir", kernel.build_dir, "--no-depmod"],
        workdir=work, mounts=kernel.mounts, limits=Limits(),
    )
    elapsed = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


def main() -> None:
    fresh = fresh_cache()
    from kmodgate.build.kernel_tree import stage_kernel_tree
    from kmodgate.build.matrix import default_jobs, resolve_source, run_build_matrix
    from kmodgate.results import CheckResult

    cores = default_jobs()
    kernels = [f"debian:{r}" for r in pick_kernels()]
    sources = [f"debian:{p}" for p in PACKAGES]
    print(f"{len(sources)} packages x {len(kernels)} kernels on {cores} cores: "
          + ", ".join(k.removeprefix("debian:") for k in kernels), file=sys.stderr)
    for ref in kernels:
        stage_kernel_tree(ref)  # warm: downloads and unpacking are not what is measured
    loaded = {ref: resolve_source(ref) for ref in sources}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    first: list[CheckResult] = []
    second: list[CheckResult] = []
    t_first = timed(lambda: first.extend(run_build_matrix(kernels, sources, jobs=cores)))
    names = {(r.module, r.kernel): r.details.get("dkms", {}) for r in first}
    t_second = timed(lambda: second.extend(run_build_matrix(kernels, sources, jobs=cores)))
    assert all(r.details.get("cached") for r in second)

    def dkms_loop() -> None:
        for source in loaded.values():
            for kernel_ref in kernels:
                conf = names[(source.name, kernel_ref.removeprefix("debian:"))]
                dkms_build(source.tree, conf["package_name"], conf["package_version"],
                           kernel_ref)

    # The whole loop is timed, copies and kernel lookups included: they are
    # small, and it keeps both sides measured the same way.
    t_dkms = timed(dkms_loop)

    cpu = sum(r.details.get("sandbox", {}).get("cpu_seconds", 0.0) for r in first)
    phases = {k: sum(r.details.get("phases", {}).get(k, 0.0) for r in first)
              for k in ("prepare", "wait", "compile")}
    outcomes = ", ".join(f"{r.module}@{r.kernel}={r.outcome.value}" for r in first)
    capacity = cpu / cores
    print(f"outcomes: {outcomes}")
    print("phase        wall s   CPU s (ours)   CPU s (other processes)   load at end")
    for label, t in (("dkms loop", t_dkms), ("first run", t_first), ("second run", t_second)):
        print(f"{label:11s} {t.wall:7.2f}   {t.ours:12.2f}   {t.others:23.2f}   {t.load}")
    print(f"first run, summed over cells: prepare {phases['prepare']:.2f} s, waiting for a "
          f"core {phases['wait']:.2f} s, compile {phases['compile']:.2f} s (wall, per cell)")
    print(f"compile CPU time (build sandboxes' rusage: make and what it runs): {cpu:.2f} s; "
          f"kmodgate's CPU outside it: {t_first.ours - cpu:.2f} s")
    print(f"first run vs the dkms loop:  {t_dkms.wall / t_first.wall:6.2f}x faster   "
          "(floor: at least 1.8x)")
    print(f"first run wall vs compile CPU / {cores} cores ({capacity:.2f} s): "
          f"{t_first.wall / capacity:6.2f}x   (ceiling: at most 1.15x)")
    # Context, not the floor: the same ratio against the cores other
    # processes left free during the run.
    free = cores - t_first.others / t_first.wall
    if 0 < free < cores:
        print(f"  (other processes used {cores - free:.2f} of the {cores} cores meanwhile; "
              f"against the {free:.2f} left: {t_first.wall / (cpu / free):.2f}x)")
    print(f"second run vs the first:     {t_first.wall / t_second.wall:6.0f}x faster   "
          "(floor: at least 50x)")
    shutil.rmtree(fresh, ignore_errors=True)


if __name__ == "__main__":
    main()
