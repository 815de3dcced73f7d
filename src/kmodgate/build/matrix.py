"""The build check as a matrix: every module source against every kernel.

Cells whose inputs are unchanged (see ``kbuild.cell_fingerprint``) are read
from the result cache instead of rebuilt; the cache lives under the shared
kmodgate cache, survives across runs, and is safe when several runs share it:
a cell is built under an exclusive lock on its fingerprint, so two runs
wanting the same cell build it once, and results are written atomically.

The rest run concurrently.  The cores are shared between cells and each
cell's ``make -j``: with more cells than cores each builds with ``-j1`` (a
module is a handful of files, so cell-level parallelism wastes nothing),
with fewer the spare cores go to make.  Never more compile jobs than cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodgate.abi.compare import Outcome
from kmodgate.build.kbuild import build_cell, cell_fingerprint, relabel
from kmodgate.build.kernel_tree import KernelTree, apt_lists_state, stage_kernel_tree
from kmodgate.build.sandbox import Limits
from kmodgate.build.toolchain import Toolchain, ToolchainPolicy, select_toolchain
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import UserError
from kmodgate.results import CheckResult
from kmodgate.sources.module_sources import ModuleSource, load_source

# Resolving references downloads packages: I/O, not CPU, so a few at a time.
RESOLVE_WORKERS = 4


@dataclass(frozen=True)
class Cell:
    source: ModuleSource
    kernel: KernelTree
    toolchain: Toolchain
    fingerprint: str


def default_jobs() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_build_matrix(
    kernel_refs: Sequence[str],
    source_refs: Sequence[str],
    *,
    jobs: int | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
    toolchain_policy: ToolchainPolicy | None = None,
    limits: Limits | None = None,
) -> list[CheckResult]:
    """Build every source against every kernel; results in (source, kernel) order.

    *jobs* caps concurrent compile jobs (default: the machine's cores).
    *on_result* is called with each result as it becomes known, cached ones
    first, from the calling thread.  UserError if a reference names nothing;
    a cell whose build machinery fails is an ``error`` result, not an exception.
    """
    if not kernel_refs or not source_refs:
        raise UserError("a build matrix needs at least one kernel and one module source")
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, not {jobs}")
    policy = toolchain_policy or ToolchainPolicy()
    kernels, sources = _resolve(_unique(kernel_refs), _unique(source_refs))
    toolchains = {k.ref: select_toolchain(k.cc_version_text, policy) for k in kernels}
    cells = [
        Cell(s, k, toolchains[k.ref], cell_fingerprint(s, k, toolchains[k.ref]))
        for s in sources
        for k in kernels
    ]

    results: dict[int, CheckResult] = {}
    missing: list[int] = []
    for i, cell in enumerate(cells):
        cached = read_cached(cell.fingerprint)
        if cached is None:
            missing.append(i)
            continue
        results[i] = cached = relabel(cached, cell.source, cell.kernel)
        if on_result:
            on_result(cached)

    if missing:
        workers = min(jobs, len(missing))
        make_jobs = max(1, jobs // workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kmodgate-build") as pool:
            futures: dict[Future[CheckResult], int] = {
                pool.submit(_build_or_wait, cells[i], make_jobs, limits): i for i in missing
            }
            for future in as_completed(futures):
                result = future.result()
                results[futures[future]] = result
                if on_result:
                    on_result(result)
    return [results[i] for i in range(len(cells))]


def _unique(refs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(refs))


def _resolve(kernel_refs: list[str], source_refs: list[str]) -> tuple[
        list[KernelTree], list[ModuleSource]]:
    with ThreadPoolExecutor(max_workers=RESOLVE_WORKERS) as pool:
        kernel_futures = [pool.submit(stage_kernel_tree, r) for r in kernel_refs]
        source_futures = [pool.submit(resolve_source, r) for r in source_refs]
        return ([f.result() for f in kernel_futures], [f.result() for f in source_futures])


def resolve_source(ref: str) -> ModuleSource:
    """load_source, memoised for Debian packages against the state of apt's lists.

    Which version of a -dkms package is current costs apt-cache calls and a
    hash of the unpacked tree; while apt's lists are unchanged neither can
    change (the unpacked tree is keyed by the .deb's content), and an
    unchanged second run must not spend seconds finding that out.  Git refs
    and directories can change at any time and are always loaded afresh.
    """
    if not ref.startswith("debian:"):
        return load_source(ref)
    memo = cache_subdir("build-trees") / "debian-sources.json"
    state = apt_lists_state()
    try:
        known: dict[str, dict[str, Any]] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(ref)
    if entry and entry.get("apt") == state and Path(entry["tree"]).is_dir():
        return ModuleSource(ref=ref, name=entry["name"], version=entry["version"],
                            tree=Path(entry["tree"]), tree_hash=entry["tree_hash"],
                            commit=None, build_depends=tuple(entry["build_depends"]))
    source = load_source(ref)
    try:
        known = json.loads(memo.read_text())  # another run may have added entries
    except (OSError, ValueError):
        known = {}
    known[ref] = {"apt": state, "name": source.name, "version": source.version,
                  "tree": str(source.tree), "tree_hash": source.tree_hash,
                  "build_depends": list(source.build_depends)}
    atomic_write_bytes(memo, json.dumps(known, sort_keys=True).encode())
    return source


def _build_or_wait(cell: Cell, make_jobs: int, limits: Limits | None) -> CheckResult:
    """Build the cell unless another run is building it; then take that run's result."""
    with _cell_lock(cell.fingerprint):
        cached = read_cached(cell.fingerprint)
        if cached is not None:
            return relabel(cached, cell.source, cell.kernel)
        result = build_cell(cell.source, cell.kernel, cell.toolchain, make_jobs=make_jobs,
                            limits=limits, fingerprint=cell.fingerprint)
        if result.outcome is not Outcome.ERROR:
            # An error is the machine's failure: the next run should try again.
            write_cached(result)
        return result


def _result_path(fingerprint: str) -> Path:
    return cache_subdir("build-results") / fingerprint[:2] / f"{fingerprint}.json"


@contextlib.contextmanager
def _cell_lock(fingerprint: str) -> Iterator[None]:
    path = _result_path(fingerprint).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_cached(fingerprint: str) -> CheckResult | None:
    """The stored result of a cell, if it and the files it names are still there."""
    try:
        data = json.loads(_result_path(fingerprint).read_text())
        data["outcome"] = Outcome(data["outcome"])
        result = CheckResult(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    kept = [p for p in [*result.artifacts, result.log_path] if p]
    if not all(os.path.exists(p) for p in kept):
        return None  # someone pruned the store: rebuild rather than point at nothing
    result.details["cached"] = True
    return result


def write_cached(result: CheckResult) -> None:
    data = json.dumps(result.to_json(), sort_keys=True).encode()
    atomic_write_bytes(_result_path(result.fingerprint), data)
