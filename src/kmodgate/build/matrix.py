"""The build check as a matrix: every module source against every kernel.

Cells whose inputs are unchanged (see ``kbuild.cell_fingerprint``) are read
from the result cache instead of rebuilt; the cache lives under the shared
kmodgate cache, survives across runs, and is safe when several runs share it:
a cell is built under an exclusive lock on its fingerprint, so two runs
wanting the same cell build it once, and results are written atomically.

The rest are scheduled to keep every core compiling until the end:

* a cell is queued as soon as its kernel and its source are resolved, not
  when every reference is (downloads and unpacking of one kernel overlap the
  builds against another);
* the queue is longest first (the cell's compile CPU time remembered from
  earlier runs, else an estimate from the size of its C sources), so the
  last cells running alone are short ones;
* the cores are compile slots.  A cell is prepared (dkms.conf evaluated in
  the sandbox, source copied, patches applied) before it takes a slot, one
  worker more than there are slots, so that preparation overlaps other cells'
  compiles instead of leaving a core idle between two builds;
* a cell takes one slot and builds with ``make -j1`` (a module is a handful
  of files, so cell-level parallelism wastes nothing) while others wait; the
  last cells, with nothing left behind them, take every free slot as
  ``make -j``.  Never more compile jobs than slots.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodgate.abi.compare import Outcome
from kmodgate.build.kbuild import cell_fingerprint, prepare_cell, relabel
from kmodgate.build.kernel_tree import KernelTree, stage_kernel_tree
from kmodgate.build.sandbox import Limits
from kmodgate.build.toolchain import Toolchain, ToolchainPolicy, select_toolchain
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import UserError
from kmodgate.results import CheckResult
from kmodgate.sources.debian import apt_lists_state
from kmodgate.sources.module_sources import ModuleSource, load_source

# Resolving references downloads packages: I/O, not CPU, so a few at a time.
RESOLVE_WORKERS = 4

# Cells prepared ahead of a free compile slot.  One is enough: preparing takes
# a fraction of a second, a compile seconds.
PREPARE_AHEAD = 1

# Compile-time estimate for a source never built before, in CPU seconds: kbuild's
# fixed cost, plus per C file, plus per byte of C.  Only the order matters.
COST_BASE, COST_PER_FILE, COST_PER_BYTE = 1.0, 0.6, 1e-5


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
    *on_result* is called with each result as it becomes known, from the
    calling thread; a cached cell is reported as soon as its references
    resolve.  UserError if a reference names nothing (cells already started
    finish first, and keep their cached results); a cell whose build
    machinery fails is an ``error`` result, not an exception.
    """
    if not kernel_refs or not source_refs:
        raise UserError("a build matrix needs at least one kernel and one module source")
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, not {jobs}")
    policy = toolchain_policy or ToolchainPolicy()
    kernel_refs, source_refs = _unique(kernel_refs), _unique(source_refs)
    nk = len(kernel_refs)
    total = nk * len(source_refs)
    events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
    kernels: dict[int, KernelTree] = {}
    sources: dict[int, ModuleSource] = {}
    toolchains: dict[int, Toolchain] = {}
    results: dict[int, CheckResult] = {}
    costs = _CostMemory()
    scheduler = _Scheduler(jobs, limits, events, costs)
    failure: BaseException | None = None

    def offer(si: int, ki: int) -> None:
        cell = Cell(sources[si], kernels[ki], toolchains[ki],
                    cell_fingerprint(sources[si], kernels[ki], toolchains[ki]))
        index = si * nk + ki
        cached = read_cached(cell.fingerprint)
        if cached is None:
            batch.append((index, cell, costs.estimate(cell)))
            return
        results[index] = cached = relabel(cached, cell.source, cell.kernel)
        if on_result:
            on_result(cached)

    resolver = ThreadPoolExecutor(max_workers=RESOLVE_WORKERS,
                                  thread_name_prefix="kmodgate-resolve")
    try:
        def resolving(kind: str, i: int, future: Future[Any]) -> None:
            future.add_done_callback(lambda f: events.put((kind, i, f)))

        for i, ref in enumerate(kernel_refs):
            resolving("kernel", i, resolver.submit(stage_kernel_tree, ref))
        for i, ref in enumerate(source_refs):
            resolving("source", i, resolver.submit(resolve_source, ref))
        unresolved = nk + len(source_refs)
        scheduler.start()
        batch: list[tuple[int, Cell, float]] = []
        while len(results) < total and not (failure and scheduler.idle()):
            # Everything that has happened, at once: references resolving
            # together are queued together, longest first, rather than in the
            # order their threads happened to finish.
            happened = [events.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    happened.append(events.get_nowait())
            for kind, i, payload in happened:
                if kind == "result":
                    results[i] = payload
                    if on_result:
                        on_result(payload)
                    continue
                if kind == "crash":
                    raise payload
                unresolved -= 1
                try:
                    value = payload.result()
                except BaseException as exc:  # re-raised once the builds stop
                    failure = failure or exc
                    scheduler.cancel_pending()
                else:
                    if failure is None and kind == "kernel":
                        kernels[i] = value
                        toolchains[i] = select_toolchain(value.cc_version_text, policy)
                        for si in sources:
                            offer(si, i)
                    elif failure is None:
                        sources[i] = value
                        for ki in kernels:
                            offer(i, ki)
            if failure is None:
                scheduler.submit(batch)
            batch.clear()
            if unresolved == 0:
                scheduler.close()
        if failure is not None:
            raise failure
    finally:
        scheduler.cancel_pending()
        scheduler.close()
        scheduler.join()
        resolver.shutdown(wait=True, cancel_futures=True)
        costs.save()
    return [results[i] for i in range(total)]


@dataclass(order=True)
class _Queued:
    priority: float  # minus the estimated compile CPU seconds: longest first
    seq: int
    index: int = field(compare=False)
    cell: Cell = field(compare=False)


class _Scheduler:
    """Worker threads taking cells longest first; compile slots shared out as -j."""

    def __init__(self, jobs: int, limits: Limits | None,
                 events: queue.SimpleQueue[tuple[str, int, Any]], costs: _CostMemory) -> None:
        self.jobs = jobs
        self.limits = limits
        self.events = events
        self.costs = costs
        self.cond = threading.Condition()
        self.pending: list[_Queued] = []
        self.seq = 0
        self.free = jobs  # compile slots not in use
        self.preparing = 0  # cells taken from the queue, not yet asking for slots
        self.waiting = 0  # cells prepared, waiting for a free slot
        self.busy = 0  # cells taken from the queue, not yet reported
        self.closed = False  # no more cells will be submitted
        self.threads = [threading.Thread(target=self._work, name=f"kmodgate-build-{n}",
                                         daemon=True)
                        for n in range(jobs + PREPARE_AHEAD)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, cells: Sequence[tuple[int, Cell, float]]) -> None:
        """Queue (index, cell, estimated CPU seconds) triples."""
        if not cells:
            return
        with self.cond:
            for index, cell, estimate in cells:
                self.seq += 1
                heapq.heappush(self.pending, _Queued(-estimate, self.seq, index, cell))
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def cancel_pending(self) -> None:
        with self.cond:
            self.pending.clear()
            self.cond.notify_all()

    def idle(self) -> bool:
        with self.cond:
            return not self.pending and self.busy == 0

    def join(self) -> None:
        for t in self.threads:
            if t.is_alive():
                t.join()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if not self.pending:
                    return
                item = heapq.heappop(self.pending)
                self.preparing += 1
                self.busy += 1
            try:
                result = self._build_or_wait(item.cell)
            except BaseException as exc:  # handed to the calling thread
                self.events.put(("crash", item.index, exc))
                result = None
            with self.cond:
                self.busy -= 1
            if result is not None:
                self.events.put(("result", item.index, result))

    def _slots(self) -> int:
        """Wait for a compile slot; the last cells take every free one."""
        with self.cond:
            self.preparing -= 1
            self.waiting += 1
            while self.free == 0:
                self.cond.wait()
            self.waiting -= 1
            behind = self.pending or self.preparing or self.waiting or not self.closed
            take = 1 if behind else self.free
            self.free -= take
            return take

    def _done_preparing(self) -> None:
        with self.cond:
            self.preparing -= 1

    def _release(self, n: int) -> None:
        with self.cond:
            self.free += n
            self.cond.notify_all()

    def _build_or_wait(self, cell: Cell) -> CheckResult:
        """Build the cell unless another run is building it; then take that run's result."""
        with _cell_lock(cell.fingerprint):
            cached = read_cached(cell.fingerprint)
            if cached is not None:
                self._done_preparing()
                return relabel(cached, cell.source, cell.kernel)
            prepared = prepare_cell(cell.source, cell.kernel, cell.toolchain,
                                    limits=self.limits, fingerprint=cell.fingerprint)
            if prepared.done:
                self._done_preparing()
                result = prepared.compile()
            else:
                slots = self._slots()
                try:
                    result = prepared.compile(slots)
                finally:
                    self._release(slots)
                cpu = result.details.get("sandbox", {}).get("cpu_seconds")
                if cpu:
                    self.costs.record(cell, float(cpu))
            if result.outcome is not Outcome.ERROR:
                # An error is the machine's failure: the next run should try again.
                write_cached(result)
            return result


class _CostMemory:
    """Compile CPU seconds of cells built before, by source name and kernel release."""

    def __init__(self) -> None:
        self.path = cache_subdir("build-results") / "compile-seconds.json"
        try:
            self.known: dict[str, dict[str, float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.new: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def estimate(self, cell: Cell) -> float:
        by_kernel = self.known.get(cell.source.name, {})
        if cell.kernel.release in by_kernel:
            return by_kernel[cell.kernel.release]
        if by_kernel:
            # A new kernel: assume the worst seen, since a long cell started
            # late is what leaves a core idle at the end.
            return max(by_kernel.values())
        return _size_estimate(cell.source.tree)

    def record(self, cell: Cell, cpu_seconds: float) -> None:
        with self.lock:
            self.new[(cell.source.name, cell.kernel.release)] = round(cpu_seconds, 2)

    def save(self) -> None:
        if not self.new:
            return
        try:  # another run may have recorded its own cells meanwhile
            known: dict[str, dict[str, float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            known = {}
        for (name, release), seconds in self.new.items():
            by_kernel = known.setdefault(name, {})
            by_kernel[release] = seconds
            if len(by_kernel) > 64:  # keep the newest releases seen
                for old in list(by_kernel)[:-64]:
                    del by_kernel[old]
        atomic_write_bytes(self.path, json.dumps(known, sort_keys=True).encode())


def _size_estimate(tree: Path) -> float:
    files = size = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            if name.endswith(".c"):
                files += 1
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(dirpath, name)).st_size
    return COST_BASE + COST_PER_FILE * files + COST_PER_BYTE * size


def _unique(refs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(refs))


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
