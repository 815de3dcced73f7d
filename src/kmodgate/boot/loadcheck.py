"""The load check: boot the kernel, insmod the modules, let the kernel decide.

One boot per kernel for all its modules.  The initramfs loads each module
under test after the in-tree modules it depends on (from the image itself,
by ``depends=`` in .modinfo, recursively), and /init reports every insmod and
everything the kernel logged meanwhile (see initramfs.py for the protocol).

Outcomes, per module under test:

* ``pass``: the loader accepted the module.  An init function that returns
  an error (typically -ENODEV: no such hardware in the VM) ran because the
  loader accepted it; that error is kept in ``details["init_error"]``;
* ``fail``: the loader refused it (reasons parsed from the kernel's own
  messages, with the abi check's codes where they mean the same), or its init
  oopsed the kernel (``oops``);
* ``error``: the VM failed (did not boot, panicked or hung outside any module,
  timed out): never counted as the module's fault.

After an oops nothing the kernel does can be trusted, so /init powers off at
once and the modules not yet loaded are loaded again in a fresh boot.
"""

from __future__ import annotations

import errno
import hashlib
import lzma
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodgate import __version__
from kmodgate.abi.compare import MODULE_LAYOUT, Outcome, ReasonCode
from kmodgate.abi.model import ModuleInfo
from kmodgate.boot import initramfs
from kmodgate.boot.initramfs import LoadStep
from kmodgate.boot.kernel_image import KernelImage, boot_kernel, load_kernel_image
from kmodgate.boot.qemu import (
    KVM_BOOT_PROGRESS_TIMEOUT,
    Accelerator,
    BootRun,
    boot_command,
    choose_accelerator,
    demote_kvm,
    run_qemu,
)
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import UserError
from kmodgate.results import CheckResult
from kmodgate.sources.modules import read_module_file

# Bump when what decides a load outcome changes (protocol, parsing, boot options).
LOADCHECK_VERSION = 1

DEFAULT_BOOT_TIMEOUT = 120.0

# Reason codes only the load check produces; the others are abi's ReasonCode values.
INVALID_MODULE_FORMAT = "invalid_module_format"
OOPS = "oops"
VM_ERROR = "vm_error"
ALREADY_LOADED = "already_loaded"
DUPLICATE_SYMBOL = "duplicate_symbol"
SIGNATURE_REQUIRED = "signature_required"

# The kernel command line.  loglevel=1 keeps the emulated serial line quiet
# (every byte costs time under TCG); /init reads each insmod's messages with
# dmesg instead.  Oopses still reach the console (oops_begin() raises the
# console loglevel), and panic=-1 reboots at once on a panic, which ends QEMU
# (-no-reboot) instead of leaving it to the time limit.
KERNEL_CMDLINE = "console=ttyS0 loglevel=1 panic=-1"

_TIMESTAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_MARK_RE = re.compile(r"^(KMODGATE-[A-Z]+)(?: (.*))?$")

# The loader's messages, kernel/module/{main,version}.c of Linux 6.1-6.12, as
# (pattern, reason code).  The code is None where the message is not a reason
# by itself (the CRC line names it; "Unknown symbol" after it is the same fact).
_LOADER_MESSAGES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<mod>\S+): disagrees about version of symbol (?P<sym>\S+)$"),
     ReasonCode.CRC_MISMATCH.value),
    (re.compile(r"^(?P<mod>\S+): Unknown symbol (?P<sym>\S+)(?: \(err (?P<err>-?\d+)\))?$"),
     ReasonCode.MISSING_SYMBOL.value),
    (re.compile(r"^(?P<mod>\S+): version magic '(?P<have>.*)' should be '(?P<want>.*)'$"),
     ReasonCode.VERMAGIC.value),
    # 6.1: "mod: module uses symbol (sym) from namespace NS, but does not import it."
    (re.compile(r"^(?P<mod>\S+): module uses symbol \(?(?P<sym>[^\s)]+)\)? from namespace "
                r"(?P<ns>[^\s,]+),? but does not import it"),
     ReasonCode.NAMESPACE.value),
    (re.compile(r"^(?P<mod>\S+): exports duplicate symbol (?P<sym>\S+)"), DUPLICATE_SYMBOL),
    # 6.12 compares the size of the module's struct module with its own before
    # the CRC of module_layout: the same fact (built for another struct module),
    # said first, so the same code.
    (re.compile(r"^module (?P<mod>\S+): \.gnu\.linkonce\.this_module section size must "
                r"match"),
     ReasonCode.MODULE_LAYOUT.value),
    (re.compile(r"^(?P<mod>\S+): no symbol version for (?P<sym>\S+)$"), ""),
    (re.compile(r"Loading of unsigned module is rejected|unsigned module loading is "
                r"restricted"), SIGNATURE_REQUIRED),
)

_OOPS_RE = re.compile(
    r"(BUG: .*|Oops: .*|general protection fault.*|kernel BUG at .*|"
    r"Kernel panic - not syncing: .*|invalid opcode: .*)"
)
_RIP_RE = re.compile(r"RIP: [0-9a-f]{4}:(?P<func>[A-Za-z0-9_.]+)\+0x")
_PANIC_RE = re.compile(r"Kernel panic - not syncing: (?P<why>.*)")


# --- reading the console -------------------------------------------------


@dataclass
class StepReport:
    """What the console said about one insmod."""

    index: int
    name: str
    rc: int | None = None  # None: it started but never finished
    errors: list[str] = field(default_factory=list)  # insmod's stderr
    kernel_log: list[str] = field(default_factory=list)  # without timestamps
    oops: bool = False


@dataclass
class ConsoleReport:
    booted_release: str | None = None
    steps: dict[int, StepReport] = field(default_factory=dict)
    done: bool = False
    panic: str | None = None  # the panic message, if the kernel panicked
    unmarked: list[str] = field(default_factory=list)  # raw console lines

    @property
    def crashed_step(self) -> StepReport | None:
        """The step during which the kernel oopsed or panicked, if any."""
        for s in self.steps.values():
            if s.oops:
                return s
        if self.panic is not None:
            running = [s for s in self.steps.values() if s.rc is None]
            if running:
                return running[-1]
        return None


def parse_console(console: str) -> ConsoleReport:
    """The markers /init printed, grouped by step; unmarked lines kept apart."""
    report = ConsoleReport()
    for raw in console.splitlines():
        line = raw.rstrip("\r")
        m = _MARK_RE.match(line)
        if m is None:
            report.unmarked.append(line)
            panic = _PANIC_RE.search(line)
            if panic and report.panic is None:
                report.panic = panic.group("why").strip()
            continue
        mark, rest = m.group(1), m.group(2) or ""
        if mark == initramfs.MARK_BOOTED:
            report.booted_release = rest.strip() or None
        elif mark == initramfs.MARK_DONE:
            report.done = True
        elif mark == initramfs.MARK_START:
            idx, _, name = rest.partition(" ")
            if idx.isdigit():
                report.steps[int(idx)] = StepReport(int(idx), name.strip())
        elif mark in (initramfs.MARK_ERR, initramfs.MARK_KLOG, initramfs.MARK_RESULT,
                      initramfs.MARK_OOPS):
            idx, _, text = rest.partition(" ")
            step = report.steps.get(int(idx)) if idx.isdigit() else None
            if step is None:
                continue
            if mark == initramfs.MARK_ERR:
                step.errors.append(text)
            elif mark == initramfs.MARK_KLOG:
                step.kernel_log.append(_TIMESTAMP_RE.sub("", text))
            elif mark == initramfs.MARK_RESULT:
                rc = text.rsplit(" ", 1)[-1]
                step.rc = int(rc) if rc.lstrip("-").isdigit() else None
            else:
                step.oops = True
    return report


def reasons_from_log(step: StepReport) -> list[dict[str, Any]]:
    """The kernel's reasons for refusing *step*'s module, in the abi check's
    codes where they match, one per (code, symbol) however often it was said
    (busybox insmod retries with init_module(2) after finit_module(2) fails,
    so the loader says everything twice)."""
    reasons: list[dict[str, Any]] = []
    seen: set[tuple[str, str | None]] = set()
    crc_symbols: set[str] = set()

    def add(code: str, message: str, symbol: str | None) -> None:
        if (code, symbol) in seen:
            return
        seen.add((code, symbol))
        entry: dict[str, Any] = {"code": code, "message": message}
        if symbol is not None:
            entry["symbol"] = symbol
        reasons.append(entry)

    for line in step.kernel_log:
        for pattern, code in _LOADER_MESSAGES:
            m = pattern.search(line)
            if m is None or not code:
                continue
            groups = m.groupdict()
            symbol = groups.get("sym")
            if code == ReasonCode.CRC_MISMATCH.value:
                if symbol == MODULE_LAYOUT:
                    code = ReasonCode.MODULE_LAYOUT.value
                crc_symbols.add(symbol or "")
            if code == ReasonCode.MISSING_SYMBOL.value and symbol in crc_symbols:
                break  # "Unknown symbol X (err -22)" after "disagrees about X"
            message = line[m.end("mod") + 2:] if groups.get("mod") else line
            add(code, message, symbol)
            break
    if step.oops:
        add(OOPS, _oops_message(step.kernel_log), _oops_function(step.kernel_log))
    rc = step.rc
    if not reasons and rc is not None and 0 < rc < 128:
        if rc == errno.ENOEXEC:
            add(INVALID_MODULE_FORMAT, _insmod_message(step) or "Invalid module format", None)
        elif rc == errno.EEXIST:
            add(ALREADY_LOADED, "a module of this name is already loaded or built in", None)
    return reasons


def _oops_message(log: Sequence[str]) -> str:
    for line in log:
        m = _OOPS_RE.search(line)
        if m:
            return m.group(1).strip()
    return "the kernel oopsed while loading the module"


def _oops_function(log: Sequence[str]) -> str | None:
    for line in log:
        m = _RIP_RE.search(line)
        if m:
            return m.group("func")
    return None


def _insmod_message(step: StepReport) -> str | None:
    for line in step.errors:
        if "can't insert" in line:
            return line.rsplit(": ", 1)[-1]
    return step.errors[-1] if step.errors else None


# --- planning the boots -----------------------------------------------------


@dataclass(frozen=True)
class ModuleUnderTest:
    path: Path
    info: ModuleInfo


def plan_rounds(modules: Sequence[ModuleUnderTest]) -> list[list[ModuleUnderTest]]:
    """Modules split into boots in which every name is loaded once: the k-th
    module of each name goes to boot k (the loader refuses a second module of
    a name already loaded)."""
    rounds: list[list[ModuleUnderTest]] = []
    seen: dict[str, int] = {}
    for m in modules:
        k = seen.get(m.info.name, 0)
        seen[m.info.name] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(m)
    return rounds


def load_order(
    modules: Sequence[ModuleUnderTest], image: KernelImage, *, exclude: Iterable[str] = ()
) -> list[LoadStep]:
    """Every insmod of one boot in dependency order: each module under test
    after the modules its ``depends=`` names, recursively.  A dependency is the
    module under test of that name if there is one, else the image's own; a
    name neither provides is left to the kernel, which will say what is missing."""
    under_test = {m.info.name: m for m in modules}
    excluded = set(exclude)
    order: list[LoadStep] = []
    placed: set[str] = set()
    visiting: set[str] = set()
    infos: dict[str, ModuleInfo] = {}

    def depends_of(name: str) -> tuple[Path, list[str]] | None:
        if name in under_test:
            m = under_test[name]
            return m.path, m.info.depends
        path = image.module_files.get(name)
        if path is None:
            return None
        if name not in infos:
            infos[name] = read_module_file(path)
        return path, infos[name].depends

    def visit(name: str) -> None:
        if name in placed or name in visiting or name in excluded:
            return  # a cycle cannot load anyway; the kernel will say so
        found = depends_of(name)
        if found is None:
            return
        path, deps = found
        visiting.add(name)
        for dep in deps:
            visit(dep)
        visiting.discard(name)
        placed.add(name)
        order.append(LoadStep(name, path, name in under_test))

    for m in modules:
        visit(m.info.name)
    return order


# --- running -----------------------------------------------------------------


@dataclass
class _Boot:
    """One boot's evidence, for results and logs."""

    number: int
    run: BootRun
    report: ConsoleReport
    steps: list[LoadStep]
    log_path: str | None


def run_load_checks(
    kernel_ref: str,
    module_paths: Sequence[Path],
    *,
    timeout: float = DEFAULT_BOOT_TIMEOUT,
    accelerator: str = "auto",
    memory_mb: int = 256,
) -> list[CheckResult]:
    """Load every module of *module_paths* on the kernel *kernel_ref* names
    (see kernel_image.py), booting it once (more only after an oops, a panic
    in a module's init, or for modules of the same name), and return one
    ``kind="load"`` result per module, in the order given.

    *timeout* limits each boot, from QEMU's start to its exit.
    """
    image = load_kernel_image(kernel_ref)
    modules = [ModuleUnderTest(Path(p), read_module_file(Path(p))) for p in module_paths]
    accel = choose_accelerator(accelerator)
    busybox = initramfs.busybox_binary()
    kernel_id = _file_sha256(image.vmlinuz)
    kernel_file = boot_kernel(image.vmlinuz)
    results: dict[int, CheckResult] = {}
    position = {id(m): i for i, m in enumerate(modules)}
    queue = plan_rounds(modules)
    crashed: set[str] = set()
    boots = 0
    # Every boot settles at least one module or stops the reruns, so this
    # bound is never reached unless the guest keeps dying between insmods.
    max_boots = len(modules) + len(queue) + 2
    while queue:
        group = queue.pop(0)
        boots += 1
        boot = _boot_once(image, kernel_file, group, accel, busybox, boots, timeout=timeout,
                          memory_mb=memory_mb, exclude=crashed)
        accel = boot.run.accelerator  # TCG from now on if KVM stalled
        report = boot.report
        crashed_step = report.crashed_step
        vm_failed = crashed_step is None and not report.done
        step_reports = {s.name: report.steps.get(i) for i, s in enumerate(boot.steps)}
        rerun: list[ModuleUnderTest] = []
        for m in group:
            step = step_reports.get(m.info.name)
            r = _result_for(m, image, kernel_ref, boot, step, kernel_id,
                            crashed_step, vm_failed, timeout)
            if r is None:
                rerun.append(m)
            else:
                results[position[id(m)]] = r
        if crashed_step is not None:
            crashed.add(crashed_step.name)
        made_progress = any(s.rc is not None for s in report.steps.values())
        if rerun and boots < max_boots and (crashed_step is not None or made_progress):
            _requeue(queue, rerun)
        else:
            for m in rerun:
                results[position[id(m)]] = _vm_error(
                    m, image, kernel_ref, boot, kernel_id,
                    _vm_failure_message(boot, timeout))
    return [results[i] for i in range(len(modules))]


def _requeue(queue: list[list[ModuleUnderTest]], rerun: list[ModuleUnderTest]) -> None:
    """Put *rerun* into the next boot if no name clashes with it, else before it."""
    if queue and not {m.info.name for m in rerun} & {m.info.name for m in queue[0]}:
        queue[0] = rerun + queue[0]
    else:
        queue.insert(0, rerun)


def run_load_matrix(
    kernel_refs: Sequence[str],
    module_paths: Sequence[Path],
    *,
    jobs: int | None = None,
    timeout: float = DEFAULT_BOOT_TIMEOUT,
    accelerator: str = "auto",
) -> list[CheckResult]:
    """run_load_checks for each kernel, booting up to *jobs* kernels at once
    (default: one per core; each TCG guest keeps one core busy)."""
    choose_accelerator(accelerator)  # probe once, before the boots race for it
    workers = max(1, min(jobs or os.cpu_count() or 1, len(kernel_refs) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(
            lambda ref: run_load_checks(ref, module_paths, timeout=timeout,
                                        accelerator=accelerator),
            kernel_refs,
        ))
    return [r for part in parts for r in part]


def _boot_once(
    image: KernelImage,
    kernel_file: Path,
    group: Sequence[ModuleUnderTest],
    accel: Accelerator,
    busybox: Path,
    number: int,
    *,
    timeout: float,
    memory_mb: int,
    exclude: Iterable[str],
) -> _Boot:
    steps = load_order(group, image, exclude=exclude)
    with tempfile.TemporaryDirectory(prefix="kmodgate-boot-") as tmp:
        initrd = initramfs.write_initramfs(steps, busybox, Path(tmp) / "initramfs.cpio")
        command = boot_command(accel, kernel_file, initrd, KERNEL_CMDLINE,
                               memory_mb=memory_mb)
        run = _run(command, accel, timeout)
        if run.stalled:
            # The probe guest ran but this kernel did not reach /init: KVM
            # does not really work here.  Say so for every later boot, and
            # boot this one again under TCG.
            accel = demote_kvm(f"a kernel made no progress under KVM within "
                               f"{KVM_BOOT_PROGRESS_TIMEOUT:.0f} s")
            command = boot_command(accel, kernel_file, initrd, KERNEL_CMDLINE,
                                   memory_mb=memory_mb)
            run = _run(command, accel, timeout)
    report = parse_console(run.console)
    return _Boot(number, run, report, steps, _save_log(run))


def _run(command: list[str], accel: Accelerator, timeout: float) -> BootRun:
    # Under TCG a stall is just slowness, bounded by the time limit; under KVM
    # it is the sign of a host whose KVM hangs real kernels.
    progress = ((initramfs.MARK_BOOTED, KVM_BOOT_PROGRESS_TIMEOUT)
                if accel.name == "kvm" and accel.detected else None)
    return run_qemu(
        command, accel, timeout=timeout,
        done=lambda text: initramfs.MARK_DONE in text or initramfs.MARK_OOPS in text,
        marks=(initramfs.MARK_BOOTED, initramfs.MARK_DONE),
        progress=progress,
    )


def _save_log(run: BootRun) -> str | None:
    """The console, compressed, under the cache by content: the evidence a
    maintainer reads when a module is refused or the VM failed."""
    data = run.console.encode()
    path = cache_subdir("load-logs") / f"{hashlib.sha256(data).hexdigest()[:24]}.log.xz"
    if not path.exists():
        atomic_write_bytes(path, lzma.compress(data))
    return str(path)


def _result_for(
    m: ModuleUnderTest,
    image: KernelImage,
    kernel_ref: str,
    boot: _Boot,
    step: StepReport | None,
    kernel_id: str,
    crashed_step: StepReport | None,
    vm_failed: bool,
    timeout: float,
) -> CheckResult | None:
    """The module's result from this boot, or None when it must be loaded again."""
    name = m.info.name
    if step is None or step.rc is None:
        if crashed_step is not None and step is not None and crashed_step.name == name:
            # It panicked the kernel inside its own init.
            step.oops = True
            return _make(m, image, kernel_ref, boot, kernel_id, Outcome.FAIL,
                         reasons_from_log(_with_console_oops(step, boot.report)), step)
        if crashed_step is not None and crashed_step.name != name:
            if _needs(m, crashed_step.name, image):
                return _vm_error(m, image, kernel_ref, boot, kernel_id,
                                 f"its dependency {crashed_step.name} crashed the kernel")
            return None  # not reached before the crash: load it in a fresh boot
        if vm_failed and step is not None and step.rc is None:
            # It was loading when the VM stopped answering: the hang may be
            # the module's, but a time limit is not evidence enough to blame it.
            return _vm_error(m, image, kernel_ref, boot, kernel_id,
                             f"the VM stopped while {name} was loading: "
                             + _vm_failure_message(boot, timeout))
        return None
    reasons = reasons_from_log(step)
    outcome = Outcome.FAIL if reasons else Outcome.PASS
    return _make(m, image, kernel_ref, boot, kernel_id, outcome, reasons, step)


def _with_console_oops(step: StepReport, report: ConsoleReport) -> StepReport:
    """A panicked step has no KLOG lines (dmesg never ran): use the raw console."""
    if not step.kernel_log:
        step.kernel_log = [_TIMESTAMP_RE.sub("", ln) for ln in report.unmarked]
    return step


def _needs(m: ModuleUnderTest, name: str, image: KernelImage) -> bool:
    """Whether *m* needs the module *name* loaded first (directly or not)."""
    return any(s.name == name for s in load_order([m], image) if s.name != m.info.name)


def _vm_failure_message(boot: _Boot, timeout: float) -> str:
    run, report = boot.run, boot.report
    if report.panic:
        return f"the kernel panicked: {report.panic}"
    if run.timed_out:
        where = "after /init started" if report.booted_release else "before /init started"
        return f"the boot did not finish within {timeout:.0f} s ({where})"
    if report.booted_release is None:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return f"QEMU exited (status {run.returncode}) before /init started: {tail}"
    return f"QEMU exited (status {run.returncode}) before every module was loaded"


def _vm_error(
    m: ModuleUnderTest,
    image: KernelImage,
    kernel_ref: str,
    boot: _Boot,
    kernel_id: str,
    message: str,
) -> CheckResult:
    reasons = [{"code": VM_ERROR, "message": message}]
    return _make(m, image, kernel_ref, boot, kernel_id, Outcome.ERROR, reasons, None)


def _make(
    m: ModuleUnderTest,
    image: KernelImage,
    kernel_ref: str,
    boot: _Boot,
    kernel_id: str,
    outcome: Outcome,
    reasons: list[dict[str, Any]],
    step: StepReport | None,
) -> CheckResult:
    info = m.info
    accel = boot.run.accelerator
    details: dict[str, Any] = {
        "module_path": str(m.path),
        "module_sha256": info.sha256,
        "accelerator": accel.name,
        "accelerator_reason": accel.reason,
        "boot_number": boot.number,
        "boot_seconds": round(boot.run.duration_seconds, 3),
        "seconds_to_init": _rounded(boot.run.marks.get(initramfs.MARK_BOOTED)),
        "booted_release": boot.report.booted_release,
    }
    deps = [s.name for s in load_order([m], image) if s.name != info.name]
    details["dependencies"] = deps
    if step is not None:
        details["insmod_rc"] = step.rc
        details["kernel_log"] = step.kernel_log
        if step.errors:
            details["insmod_error"] = step.errors
        if outcome is Outcome.PASS and step.rc:
            # The loader accepted the module and ran its init, which refused.
            details["init_error"] = errno.errorcode.get(step.rc, str(step.rc))
    failed_deps = [
        s.name for i, s in enumerate(boot.steps)
        if s.name in deps and (boot.report.steps.get(i) is None
                               or boot.report.steps[i].rc not in (0, None))
    ]
    if failed_deps:
        details["dependency_failures"] = failed_deps
    fingerprint = hashlib.sha256(
        f"load:{LOADCHECK_VERSION}:{info.sha256}:{kernel_id}:{KERNEL_CMDLINE}".encode()
    ).hexdigest()
    return CheckResult(
        module=info.name,
        module_version=(info.srcversion or (info.sha256 or "")[:12]),
        kernel=image.release,
        kind="load",
        outcome=outcome,
        reasons=reasons,
        fingerprint=fingerprint,
        reproducer=f"kmodgate check --kind load --kernel {kernel_ref} --module {m.path}",
        toolchain=f"qemu-system-x86_64 ({accel.name}), kmodgate {__version__}",
        log_path=boot.log_path,
        duration_seconds=round(boot.run.duration_seconds, 3),
        details=details,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise UserError(f"cannot read the kernel image: {exc.strerror}", where=path) from None
    return h.hexdigest()


# --- agreement with the abi check --------------------------------------------

# Which abi codes predict a refusal the kernel states with a given load code.
# The loader stops at its first objection and says some things in one way
# only ("Unknown symbol" for a GPL-only symbol, for a symbol without a CRC,
# ENOEXEC for any layout or magic problem).
_PREDICTED_BY: dict[str, frozenset[str]] = {
    ReasonCode.MODULE_LAYOUT.value: frozenset({ReasonCode.MODULE_LAYOUT.value}),
    ReasonCode.CRC_MISMATCH.value: frozenset({ReasonCode.CRC_MISMATCH.value}),
    ReasonCode.MISSING_SYMBOL.value: frozenset({
        ReasonCode.MISSING_SYMBOL.value, ReasonCode.GPL_ONLY.value,
        ReasonCode.NO_VERSIONS.value, ReasonCode.CRC_MISMATCH.value,
    }),
    ReasonCode.VERMAGIC.value: frozenset({ReasonCode.VERMAGIC.value,
                                          ReasonCode.NO_VERMAGIC.value}),
    ReasonCode.NAMESPACE.value: frozenset({ReasonCode.NAMESPACE.value}),
    INVALID_MODULE_FORMAT: frozenset({
        ReasonCode.MODULE_LAYOUT.value, ReasonCode.VERMAGIC.value,
        ReasonCode.NO_VERMAGIC.value, ReasonCode.MACHINE.value,
    }),
}

AGREE = "agree"
DISAGREE = "disagree"
NOT_COMPARABLE = "not_comparable"


@dataclass
class AgreementCell:
    """One (module binary, kernel) cell both checks have a result for."""

    module: str
    module_path: str
    kernel: str
    abi_outcome: str
    load_outcome: str
    abi_codes: list[str]
    load_codes: list[str]
    status: str  # AGREE, DISAGREE or NOT_COMPARABLE
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module, "module_path": self.module_path, "kernel": self.kernel,
            "abi_outcome": self.abi_outcome, "load_outcome": self.load_outcome,
            "abi_codes": self.abi_codes, "load_codes": self.load_codes,
            "status": self.status, "note": self.note,
        }


@dataclass
class AgreementReport:
    """The abi check's predictions against the kernel's verdicts.

    Every disagreement is a bug in one of the two checks; cells where either
    check could not decide (``error``/``skip``) are counted apart.
    """

    cells: list[AgreementCell]
    abi_only: int = 0  # abi results with no load result for the same cell
    load_only: int = 0

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)

    @property
    def disagreements(self) -> list[AgreementCell]:
        return [c for c in self.cells if c.status == DISAGREE]

    def to_json(self) -> dict[str, Any]:
        return {
            "compared": self.count(AGREE) + self.count(DISAGREE),
            "agree": self.count(AGREE),
            "disagree": self.count(DISAGREE),
            "not_comparable": self.count(NOT_COMPARABLE),
            "abi_only": self.abi_only,
            "load_only": self.load_only,
            "disagreements": [c.to_json() for c in self.disagreements],
            "cells": [c.to_json() for c in self.cells],
        }

    def summary_lines(self) -> list[str]:
        """The report in words, disagreements first and loudest."""
        lines: list[str] = []
        for c in self.disagreements:
            lines.append(
                f"DISAGREEMENT {c.module} on {c.kernel}: abi says {c.abi_outcome} "
                f"{c.abi_codes}, the kernel says {c.load_outcome} {c.load_codes}: {c.note} "
                f"({c.module_path})"
            )
        compared = self.count(AGREE) + self.count(DISAGREE)
        lines.append(
            f"abi vs load: {compared} cells compared, {self.count(AGREE)} agree, "
            f"{self.count(DISAGREE)} disagree; {self.count(NOT_COMPARABLE)} not comparable; "
            f"{self.abi_only} abi-only, {self.load_only} load-only"
        )
        return lines


def _cell_key(r: CheckResult) -> tuple[str, str]:
    path = str(r.details.get("module_path", ""))
    return r.kernel, os.path.realpath(path) if path else r.module


def agreement(
    abi_results: Iterable[CheckResult], load_results: Iterable[CheckResult]
) -> AgreementReport:
    """Compare the abi check's prediction with the kernel's verdict for every
    (module binary, kernel) cell that has both, matched by kernel release and
    the module file's path."""
    abi = {_cell_key(r): r for r in abi_results if r.kind == "abi"}
    load = {_cell_key(r): r for r in load_results if r.kind == "load"}
    cells = [_compare(abi[k], load[k]) for k in sorted(abi.keys() & load.keys())]
    return AgreementReport(cells, abi_only=len(abi.keys() - load.keys()),
                           load_only=len(load.keys() - abi.keys()))


def _compare(a: CheckResult, ld: CheckResult) -> AgreementCell:
    abi_codes = [str(r.get("code")) for r in a.reasons]
    load_codes = [str(r.get("code")) for r in ld.reasons]
    cell = AgreementCell(a.module, str(ld.details.get("module_path", "")), a.kernel,
                         a.outcome.value, ld.outcome.value, abi_codes, load_codes, AGREE)
    undecided = {Outcome.ERROR, Outcome.SKIP}
    if a.outcome in undecided or ld.outcome in undecided:
        cell.status = NOT_COMPARABLE
        cell.note = "one of the checks could not decide"
        return cell
    # An oops happens after the loader accepted the module: for the question
    # both checks answer (will the loader take it?) that is an acceptance.
    accepted = ld.outcome is Outcome.PASS or set(load_codes) == {OOPS}
    if a.outcome is Outcome.PASS and accepted:
        return cell
    cell.status = DISAGREE
    if a.outcome is Outcome.PASS:
        cell.note = "abi predicted a load; the kernel refused the module"
        return cell
    if accepted:
        cell.note = "abi predicted a refusal; the kernel loaded the module"
        return cell
    predicted = {(str(r.get("code")), r.get("symbol")) for r in a.reasons}
    for r in ld.reasons:
        code, symbol = str(r.get("code")), r.get("symbol")
        if code == OOPS:
            continue
        allowed = _PREDICTED_BY.get(code, frozenset())
        if not any(c in allowed and (symbol is None or s == symbol) for c, s in predicted):
            cell.note = f"the kernel refused it for {code} {symbol or ''}".rstrip() + \
                ", which the abi check did not predict"
            return cell
    cell.status = AGREE
    return cell
