#!/usr/bin/env python3
"""The build matrix against a serial loop of Debian's own ``dkms build``.

Four -dkms packages x four kernels (the earliest and latest 6.1 ABI, the two
newest 6.12) are built three ways and the ratios printed (not asserted):

1. a serial loop of ``dkms build``, one cell after the other, each with
   dkms's default ``-j<cores>`` -- what a distribution runs today;
2. kmodgate's first run (no cached results): cells in parallel, sharing the
   cores with make -j;
3. kmodgate's second run on unchanged inputs (every cell from the cache).

Also printed: the first run's wall time against the compile CPU time it
used divided by the cores, i.e. how close to the machine's capacity it ran.
Downloads and unpacking are warmed up first and not timed: both sides need
them.  Results go to a fresh cache directory; downloads are shared with
the normal cache.

Run: .venv/bin/python benchmarks/build_matrix.py
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("v4l2loopback-dkms", "acpi-call-dkms", "openrazer-driver-dkms", "dm-writeboost-dkms")
PLAIN_FLAVOUR = re.compile(r"^\d+\.\d+\.\d+(?:-\d+)?(?:\+deb\d+)?-amd64$")


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

    cores = default_jobs()
    kernels = [f"debian:{r}" for r in pick_kernels()]
    sources = [f"debian:{p}" for p in PACKAGES]
    print(f"{len(sources)} packages x {len(kernels)} kernels on {cores} cores: "
          + ", ".join(k.removeprefix("debian:") for k in kernels), file=sys.stderr)
    for ref in kernels:
        stage_kernel_tree(ref)  # warm: downloads and unpacking are not what is measured
    loaded = {ref: resolve_source(ref) for ref in sources}

    start = time.perf_counter()
    first = run_build_matrix(kernels, sources, jobs=cores)
    first_wall = time.perf_counter() - start
    names = {(r.module, r.kernel): r.details.get("dkms", {}) for r in first}

    start = time.perf_counter()
    second = run_build_matrix(kernels, sources, jobs=cores)
    second_wall = time.perf_counter() - start
    assert all(r.details.get("cached") for r in second)

    serial = 0.0
    for source in loaded.values():
        for kernel_ref in kernels:
            conf = names[(source.name, kernel_ref.removeprefix("debian:"))]
            serial += dkms_build(source.tree, conf["package_name"], conf["package_version"],
                                 kernel_ref)

    cpu = sum(r.details.get("sandbox", {}).get("cpu_seconds", 0.0) for r in first)
    outcomes = ", ".join(f"{r.module}@{r.kernel}={r.outcome.value}" for r in first)
    print(f"outcomes: {outcomes}")
    print(f"serial dkms build loop:      {serial:8.2f} s")
    print(f"kmodgate first run:          {first_wall:8.2f} s  "
          f"({serial / first_wall:.2f}x faster than the dkms loop; target >= 1.8x)")
    print(f"compile CPU / cores:         {cpu / cores:8.2f} s  "
          f"(first run wall is {first_wall / (cpu / cores):.2f}x of it; target <= 1.15x)")
    print(f"kmodgate second run:         {second_wall:8.3f} s  "
          f"({first_wall / second_wall:.0f}x faster than the first; target >= 50x)")
    shutil.rmtree(fresh, ignore_errors=True)


if __name__ == "__main__":
    main()
