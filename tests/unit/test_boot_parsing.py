"""The load check's readers, on serial consoles captured from real boots of
Debian 6.1 and 6.12 kernels (tests/fixtures/console_logs), and its writers
(initramfs, probe guest, vmlinux extraction) on synthesized inputs."""

from __future__ import annotations

import lzma
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.abi.compare import Outcome, ReasonCode
from kmodgate.abi.model import ModuleInfo
from kmodgate.boot import initramfs
from kmodgate.boot.initramfs import CpioEntry, LoadStep, newc_archive
from kmodgate.boot.kernel_image import extract_vmlinux, has_pvh_entry, image_from_root
from kmodgate.boot.loadcheck import (
    ALREADY_LOADED,
    DISAGREE,
    INVALID_MODULE_FORMAT,
    NOT_COMPARABLE,
    OOPS,
    ModuleUnderTest,
    StepReport,
    agreement,
    parse_console,
    plan_rounds,
    reasons_from_log,
)
from kmodgate.boot.qemu import PROBE_MARKER, _probe_boot_sector
from kmodgate.errors import UserError
from kmodgate.results import CheckResult

LOGS = Path(__file__).resolve().parent.parent / "fixtures" / "console_logs"


def console(name: str) -> str:
    return (LOGS / name).read_text()


def step_named(report_name: str, module: str) -> StepReport:
    report = parse_console(console(report_name))
    (step,) = [s for s in report.steps.values() if s.name == module]
    return step


# --- real consoles ----------------------------------------------------------


def test_61_console_steps_results_and_kernel_messages() -> None:
    report = parse_console(console("6.1-hello-crc7-oops.log"))
    assert report.booted_release == "6.1.0-56-amd64"
    assert [(s.name, s.rc) for s in report.steps.values()] == [
        ("kmodgate_hello", 0), ("crc7", 0), ("kmodgate_oops", 137)]
    hello = report.steps[0]
    # Timestamps are stripped; the loader's own words are kept.
    assert hello.kernel_log[-1] == "kmodgate_hello: loaded"
    assert reasons_from_log(hello) == []
    # /init powered off after the oops instead of printing DONE.
    assert not report.done and report.panic is None
    assert report.crashed_step is report.steps[2]


def test_61_oops_reason_names_the_faulting_function() -> None:
    step = step_named("6.1-hello-crc7-oops.log", "kmodgate_oops")
    assert step.oops
    (reason,) = reasons_from_log(step)
    assert reason == {
        "code": OOPS,
        "message": "BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "symbol": "kmodgate_oops_init",
    }


def test_61_module_of_another_abi_is_one_module_layout_reason() -> None:
    step = step_named("6.1-other-abi-deps.log", "kmodgate_hello")
    assert step.rc == 8  # ENOEXEC: busybox insmod exits with the errno
    assert step.errors == ["insmod: can't insert '/m/004-kmodgate_hello.ko': "
                           "invalid module format"]
    # busybox retries with init_module(2): the kernel says it twice, we once.
    assert len(step.kernel_log) == 2
    assert reasons_from_log(step) == [{
        "code": ReasonCode.MODULE_LAYOUT.value,
        "message": "disagrees about version of symbol module_layout",
        "symbol": "module_layout",
    }]
    report = parse_console(console("6.1-other-abi-deps.log"))
    assert report.done and report.crashed_step is None


def test_61_crc_mismatch_of_one_symbol() -> None:
    """6.1.0-54 refusing a module built for an ABI with the same module_layout."""
    step = step_named("6.1-crc-mismatch.log", "kmodgate_crc")
    assert step.rc == 22  # EINVAL: resolve_symbol() fails check_version()
    assert reasons_from_log(step) == [{
        "code": ReasonCode.CRC_MISMATCH.value,
        "message": "disagrees about version of symbol wake_up_process",
        "symbol": "wake_up_process",
    }]
    assert reasons_from_log(step_named("6.1-crc-mismatch.log", "kmodgate_hello")) == []


def test_612_struct_module_size_check_is_module_layout() -> None:
    step = step_named("6.12-struct-module-size.log", "kmodgate_hello")
    (reason,) = reasons_from_log(step)
    assert reason["code"] == ReasonCode.MODULE_LAYOUT.value
    assert "this_module section size must match" in reason["message"]


def test_612_oops() -> None:
    report = parse_console(console("6.12-hello-oops.log"))
    assert report.booted_release == "6.12.117+deb12-amd64"
    step = report.crashed_step
    assert step is not None and step.name == "kmodgate_oops"
    assert reasons_from_log(step)[0]["symbol"] == "kmodgate_oops_init"


def test_panic_before_init_is_no_module_s_fault() -> None:
    report = parse_console(console("6.1-panic-no-init.log"))
    assert report.booted_release is None and not report.steps
    assert report.panic == "VFS: Unable to mount root fs on unknown-block(0,0)"
    assert report.crashed_step is None


# --- the loader's other words -----------------------------------------------


def synthetic_step(log: list[str], rc: int, errors: list[str] | None = None) -> StepReport:
    return StepReport(0, "m", rc=rc, errors=errors or [], kernel_log=log)


def test_crc_mismatch_hides_the_unknown_symbol_line_that_follows() -> None:
    step = synthetic_step(["m: disagrees about version of symbol kmalloc_trace",
                           "m: Unknown symbol kmalloc_trace (err -22)",
                           "m: Unknown symbol gone_symbol (err -2)"], rc=2)
    assert [(r["code"], r["symbol"]) for r in reasons_from_log(step)] == [
        (ReasonCode.CRC_MISMATCH.value, "kmalloc_trace"),
        (ReasonCode.MISSING_SYMBOL.value, "gone_symbol"),
    ]


@pytest.mark.parametrize(("line", "code", "symbol"), [
    ("m: version magic '6.1.0-56-amd64 SMP mod_unload ' should be "
     "'6.1.0-56-amd64 SMP preempt mod_unload modversions '", ReasonCode.VERMAGIC.value, None),
    ("m: module uses symbol (usb_stor_probe1) from namespace USB_STORAGE, but does not "
     "import it.", ReasonCode.NAMESPACE.value, "usb_stor_probe1"),
    ("m: exports duplicate symbol crc7_be (owned by crc7)", "duplicate_symbol", "crc7_be"),
])
def test_loader_messages(line: str, code: str, symbol: str | None) -> None:
    (reason,) = reasons_from_log(synthetic_step([line], rc=8))
    assert (reason["code"], reason.get("symbol")) == (code, symbol)


def test_errno_without_a_message() -> None:
    (reason,) = reasons_from_log(synthetic_step([], rc=8, errors=[
        "insmod: can't insert '/m/000-m.ko': invalid module format"]))
    assert reason == {"code": INVALID_MODULE_FORMAT, "message": "invalid module format"}
    (reason,) = reasons_from_log(synthetic_step([], rc=17))
    assert reason["code"] == ALREADY_LOADED
    # ENODEV from the module's own init: the loader accepted it.
    assert reasons_from_log(synthetic_step([], rc=19)) == []


# --- planning -----------------------------------------------------------------


def fake_module(name: str, path: str) -> ModuleUnderTest:
    return ModuleUnderTest(Path(path), ModuleInfo(name, path, "x86_64", [], {}, [], []))


def test_modules_of_one_name_go_to_separate_boots() -> None:
    a1, b, a2, a3 = (fake_module("a", "/1"), fake_module("b", "/2"), fake_module("a", "/3"),
                     fake_module("a", "/4"))
    assert plan_rounds([a1, b, a2, a3]) == [[a1, b], [a2], [a3]]


# --- agreement ---------------------------------------------------------------


def result(kind: str, outcome: Outcome, codes: list[tuple[str, str | None]],
           path: str = "/m.ko", kernel: str = "6.1.0-56-amd64") -> CheckResult:
    reasons = [{"code": c, "message": c, **({"symbol": s} if s else {})} for c, s in codes]
    return CheckResult("m", "v", kernel, kind, outcome, reasons,
                       details={"module_path": path})


def test_agreement_on_reasons_the_loader_states_first() -> None:
    abi = [result("abi", Outcome.FAIL, [("module_layout_mismatch", "module_layout"),
                                        ("crc_mismatch", "_printk")])]
    load = [result("load", Outcome.FAIL, [("module_layout_mismatch", "module_layout")])]
    report = agreement(abi, load)
    assert (report.count("agree"), report.disagreements) == (1, [])


def test_every_kind_of_disagreement_is_reported() -> None:
    abi = [
        result("abi", Outcome.PASS, [], path="/1"),
        result("abi", Outcome.FAIL, [("missing_symbol", "x")], path="/2"),
        result("abi", Outcome.FAIL, [("missing_symbol", "x")], path="/3"),
        result("abi", Outcome.PASS, [], path="/4"),
        result("abi", Outcome.PASS, [], path="/5"),
        result("abi", Outcome.PASS, [], path="/only-abi"),
    ]
    load = [
        result("load", Outcome.FAIL, [("crc_mismatch", "y")], path="/1"),
        result("load", Outcome.PASS, [], path="/2"),
        result("load", Outcome.FAIL, [("crc_mismatch", "y")], path="/3"),
        result("load", Outcome.FAIL, [(OOPS, "init")], path="/4"),
        result("load", Outcome.ERROR, [("vm_error", None)], path="/5"),
    ]
    report = agreement(abi, load)
    by_path = {c.module_path: c for c in report.cells}
    assert [by_path[p].status for p in ("/1", "/2", "/3", "/4", "/5")] == [
        DISAGREE, DISAGREE, DISAGREE, "agree", NOT_COMPARABLE]
    assert report.abi_only == 1 and report.load_only == 0
    lines = report.summary_lines()
    assert len(lines) == 4 and all(ln.startswith("DISAGREEMENT") for ln in lines[:3])
    assert "3 disagree" in lines[-1]


# --- what the boot is made of ---------------------------------------------------


def test_newc_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    cpio = require_tool("cpio")
    data = newc_archive([
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"tool"),
        CpioEntry("odd", stat.S_IFREG | 0o644, b"x" * 5),
    ])
    listing = subprocess.run([cpio, "-t", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "bin/tool", "bin/sh", "odd"]
    subprocess.run([cpio, "-id", "--quiet", "--no-preserve-owner"], input=data, cwd=tmp_path,
                   check=True)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "bin/sh").readlink() == Path("tool")


def test_init_script_loads_in_order_and_stops_after_an_oops() -> None:
    steps = [LoadStep("tls", Path("/x/tls.ko"), False), LoadStep("bonding", Path("/b.ko"), True)]
    script = initramfs.init_script(steps)
    assert script.index("step 0 tls /m/000-tls.ko") < script.index("step 1 bonding /m/001-")
    assert f"& {initramfs.TAINT_DIE}" in script and "poweroff -f" in script


def test_probe_boot_sector() -> None:
    sector = _probe_boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    # "mov si, imm16" points at the marker inside the sector loaded at 0x7c00.
    (msg,) = struct.unpack_from("<H", sector, 8)
    assert sector[msg - 0x7C00:].startswith(PROBE_MARKER.encode())


def elf_with_notes(notes: bytes) -> bytes:
    """A minimal ELF64 little-endian file with one PT_NOTE segment."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + phdr + notes


def xen_note(ntype: int) -> bytes:
    return struct.pack("<III", 4, 4, ntype) + b"Xen\0" + b"\0\0\0\0"


def bzimage_around(payload: bytes) -> bytes:
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<II", image, 0x248, 16, len(payload) + 4)
    return bytes(image) + b"\0" * 16 + payload + struct.pack("<I", 12345)


def test_vmlinux_extraction_and_pvh_note() -> None:
    pvh = elf_with_notes(xen_note(6) + xen_note(18))
    assert has_pvh_entry(pvh)
    assert not has_pvh_entry(elf_with_notes(xen_note(6)))
    packed = lzma.compress(pvh, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(bzimage_around(packed)) == pvh
    assert extract_vmlinux(b"not a kernel" * 100) is None


# --- where kernels are found ------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_kernel_image_layouts(tmp_path: Path) -> None:
    deb = tmp_path / "deb"
    touch(deb / "boot/vmlinuz-6.1.0-56-amd64")
    touch(deb / "lib/modules/6.1.0-56-amd64/kernel/lib/crc-itu-t.ko")
    image = image_from_root(deb, "deb")
    assert (image.release, image.vmlinuz.name) == ("6.1.0-56-amd64", "vmlinuz-6.1.0-56-amd64")
    # Module names as the loader knows them: '-' becomes '_'.
    assert list(image.module_files) == ["crc_itu_t"]

    rpm = tmp_path / "rpm"
    touch(rpm / "lib/modules/6.8.5-301.fc40.x86_64/vmlinuz")
    touch(rpm / "lib/modules/6.8.5-301.fc40.x86_64/kernel/lib/crc7.ko.xz")
    image = image_from_root(rpm, "rpm")
    assert image.release == "6.8.5-301.fc40.x86_64" and list(image.module_files) == ["crc7"]

    bare = tmp_path / "bare"
    touch(bare / "vmlinuz-6.12.0")
    touch(bare / "mods/dummy.ko")
    assert image_from_root(bare, "bare").release == "6.12.0"

    with pytest.raises(UserError, match="no kernel image found"):
        image_from_root(tmp_path / "deb/lib", "nothing")
