"""Booting a kernel under qemu-system-x86_64: which accelerator, time limits,
the serial console as text, and a kill when the guest overstays.

KVM is used only when it really works.  A host can have ``/dev/kvm`` and still
hang every KVM guest (a nested setup whose CPU exposes no VMX is the case on
kmodgate's own CI machines), so the probe boots a 512-byte guest under TCG and
under KVM and accepts KVM only if the guest prints its marker about as fast
under KVM as under TCG; else everything boots under TCG, the emulator,
which is slower but never wrong.  A host can pass that probe and still hang
a real kernel, so a kernel booted under a detected KVM must also reach /init
within KVM_BOOT_PROGRESS_TIMEOUT, or KVM is given up (demote_kvm) and the
boot redone under TCG.  The verdict is cached per host (CPU flags, host
kernel, QEMU version), in memory and in the cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import InfraError, UserError

QEMU = "qemu-system-x86_64"
ACCELERATORS = ("auto", "kvm", "tcg")
KVM_DEVICE = Path("/dev/kvm")

# How long the probe guest may take under KVM: under working KVM the firmware
# and the boot sector take a fraction of a second.  It must also be no slower
# than the same guest under TCG (times KVM_PROBE_SLACK): on kmodgate's CI
# hosts a KVM guest crawls through real mode in ~6 s (TCG: 0.1 s) and then
# hangs for good once a kernel starts.
KVM_PROBE_TIMEOUT = 5.0
KVM_PROBE_SLACK = 3.0
KVM_PROBE_FLOOR = 1.0
# A kernel under a KVM that passed the probe must reach /init this soon, or
# KVM is given up for TCG (and the boot redone).  Working KVM: about a second.
KVM_BOOT_PROGRESS_TIMEOUT = 30.0

PROBE_MARKER = "KMODGATE-PROBE"
# Bump when the detection changes, so verdicts cached by an older one are redone.
DETECT_VERSION = 2


def _probe_boot_sector() -> bytes:
    """A boot sector that writes PROBE_MARKER to COM1 and halts.

    16-bit real mode at 0x7c00: xor ax,ax; mov ds,ax; mov dx,0x3f8;
    mov si,msg; loop: lodsb; test al,al; jz done; out dx,al; jmp loop;
    done: hlt; jmp done.  The UART accepts bytes without being programmed.
    """
    code = bytes.fromhex("31c0 8ed8 baf803 be157c ac 84c0 7403 ee ebf8 f4 ebfd".replace(" ", ""))
    assert len(code) == 0x15  # msg follows at 0x7c15, the address in "mov si"
    sector = code + PROBE_MARKER.encode() + b"\r\n\0"
    return sector.ljust(510, b"\0") + b"\x55\xaa"


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    reason: str  # why this one, for reports
    detected: bool = True  # False when the person asked for it by name

    @property
    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg"]


@dataclass
class BootRun:
    """What one boot produced: the console text and how it ended."""

    command: list[str]
    accelerator: Accelerator
    console: str = ""
    stderr: str = ""
    returncode: int | None = None
    timed_out: bool = False
    stalled: bool = False  # killed because the progress marker did not come in time
    finished: bool = False  # the caller's "done" predicate matched
    duration_seconds: float = 0.0
    # Seconds from start to the first console line matching `first_marker`.
    marks: dict[str, float] = field(default_factory=dict)


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise InfraError(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    return path


_detected: dict[str, Accelerator] = {}
_detect_lock = threading.Lock()


def choose_accelerator(requested: str = "auto", *, refresh: bool = False) -> Accelerator:
    """The accelerator to boot with: *requested* if it is "kvm"/"tcg", else
    KVM when a probe guest makes progress under it, TCG otherwise."""
    if requested not in ACCELERATORS:
        raise UserError(f"unknown accelerator {requested!r}: expected one of "
                        f"{', '.join(ACCELERATORS)}")
    if requested == "tcg":
        return Accelerator("tcg", "requested", detected=False)
    if requested == "kvm":
        return Accelerator("kvm", "requested", detected=False)
    with _detect_lock:
        key = _host_key()
        if not refresh and key in _detected:
            return _detected[key]
        cached = cache_subdir("boot") / f"accel-{key}.json"
        if not refresh and cached.is_file():
            try:
                data = json.loads(cached.read_text())
                found = Accelerator(str(data["name"]), str(data["reason"]))
            except (OSError, ValueError, KeyError, TypeError):
                found = _detect()
        else:
            found = _detect()
        _remember(key, found)
        return found


def _remember(key: str, found: Accelerator) -> None:
    cached = cache_subdir("boot") / f"accel-{key}.json"
    atomic_write_bytes(cached, json.dumps({"name": found.name, "reason": found.reason}).encode())
    _detected[key] = found


def demote_kvm(reason: str) -> Accelerator:
    """Record that KVM does not really work on this host after all (a real
    kernel stalled under it) and return the TCG accelerator to use instead."""
    tcg = Accelerator("tcg", f"{KVM_DEVICE} exists but {reason}")
    with _detect_lock:
        _remember(_host_key(), tcg)
    return tcg


def _host_key() -> str:
    """What decides whether KVM works: the CPU's flags, the host kernel, QEMU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    qemu = shutil.which(QEMU) or ""
    qemu_id = ""
    if qemu:
        st = os.stat(qemu)
        qemu_id = f"{qemu}:{st.st_size}:{st.st_mtime_ns}"
    text = f"{DETECT_VERSION}|{flags}|{os.uname().release}|{qemu_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _detect() -> Accelerator:
    if not KVM_DEVICE.exists():
        return Accelerator("tcg", f"{KVM_DEVICE} does not exist")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return Accelerator("tcg", f"{KVM_DEVICE} is not accessible to this user")
    tcg_seconds = probe_seconds(Accelerator("tcg", "probe"), timeout=60.0)
    if tcg_seconds is None:
        raise InfraError(f"{QEMU} could not run a 512-byte guest under TCG")
    limit = min(KVM_PROBE_TIMEOUT, max(KVM_PROBE_FLOOR, KVM_PROBE_SLACK * tcg_seconds))
    kvm_seconds = probe_seconds(Accelerator("kvm", "probe"), timeout=limit)
    if kvm_seconds is not None:
        return Accelerator("kvm", f"a probe guest ran under KVM in {kvm_seconds:.2f} s "
                                  f"(TCG: {tcg_seconds:.2f} s)")
    return Accelerator(
        "tcg", f"{KVM_DEVICE} exists but a probe guest made no progress under KVM within "
        f"{limit:.1f} s (TCG: {tcg_seconds:.2f} s): no usable hardware virtualisation"
    )


def probe(accelerator: Accelerator, *, timeout: float) -> bool:
    """Does a 512-byte guest print its marker under *accelerator* in time?"""
    return probe_seconds(accelerator, timeout=timeout) is not None


def probe_seconds(accelerator: Accelerator, *, timeout: float) -> float | None:
    """Seconds a 512-byte guest takes to print its marker under
    *accelerator*, or None if it did not within *timeout*."""
    with tempfile.TemporaryDirectory(prefix="kmodgate-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_probe_boot_sector())
        command = [
            qemu_binary(), *accelerator.qemu_args, "-m", "16", "-nodefaults",
            "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-drive", f"file={disk},format=raw,if=ide",
        ]
        run = run_qemu(command, accelerator, timeout=timeout,
                       done=lambda text: PROBE_MARKER in text, grace=0.0,
                       marks=(PROBE_MARKER,))
        return run.marks.get(PROBE_MARKER) if run.finished else None


def boot_command(
    accelerator: Accelerator,
    kernel: Path,
    initrd: Path,
    append: str,
    *,
    memory_mb: int = 256,
) -> list[str]:
    """The qemu command line for one serial-console boot that ends the process
    when the guest powers off, reboots or panics (with ``panic=-1``)."""
    return [
        qemu_binary(), *accelerator.qemu_args,
        "-m", str(memory_mb), "-smp", "1",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
    ]


def run_qemu(
    command: Sequence[str],
    accelerator: Accelerator,
    *,
    timeout: float,
    done: Callable[[str], bool] | None = None,
    grace: float = 10.0,
    marks: Sequence[str] = (),
    progress: tuple[str, float] | None = None,
) -> BootRun:
    """Run *command*, collecting the serial console until QEMU exits.

    The process is killed when *timeout* seconds have passed, or *grace*
    seconds after *done* first holds for the console text (the guest said it
    is finished and should be powering off).  *marks* are console strings
    whose first appearance is timed, for benchmarks and reports.  With
    *progress* = (marker, seconds), the guest is killed and the run marked
    ``stalled`` if the marker has not appeared by then.
    """
    run = BootRun(list(command), accelerator)
    start = time.monotonic()
    deadline = start + timeout
    chunks: list[bytes] = []
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=err, start_new_session=True,
            )
        except OSError as exc:
            raise InfraError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        text = ""
        pending_marks = list(marks)
        try:
            while True:
                now = time.monotonic()
                if progress and now - start >= progress[1] and progress[0] not in text:
                    run.stalled = True
                    break
                if now >= deadline:
                    run.timed_out = not run.finished
                    break
                if not sel.select(timeout=min(0.2, deadline - now)):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                text = b"".join(chunks).decode("utf-8", "replace")
                for mark in list(pending_marks):
                    if mark in text:
                        run.marks[mark] = time.monotonic() - start
                        pending_marks.remove(mark)
                if not run.finished and done is not None and done(text):
                    run.finished = True
                    deadline = min(deadline, time.monotonic() + grace)
        finally:
            sel.close()
            if not (run.timed_out or run.stalled):
                # The console closes a moment before the process is gone.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise InfraError(f"{command[0]} (pid {proc.pid}) did not die when killed") from None
            proc.stdout.close()
        run.returncode = proc.returncode
        err.seek(0)
        run.stderr = err.read().decode("utf-8", "replace")
    run.console = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    run.duration_seconds = time.monotonic() - start
    return run
