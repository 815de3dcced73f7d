"""The hand-written .ko reader, held to pyelftools on synthesized modules.

Every module here is written by tests/elfwriter.py in all four ELF class /
byte order combinations; what read_module returns must equal what the same
bytes say when read with pyelftools, the reference ELF library.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import lzma
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_tool
from elfwriter import (
    EM_AARCH64,
    EM_X86_64,
    LAYOUTS,
    ExportSpec,
    ModuleSpec,
    build_module,
    layout_id,
)
from kmodgate.abi.compression import compression_of, decompress
from kmodgate.abi.elf import read_module
from kmodgate.abi.model import ExportType, ModuleExport, ModuleInfo
from kmodgate.errors import UserError
from kmodgate.sources.modules import read_module_file

# pyelftools' e_machine names -> the names kmodgate reports.
MACHINE_NAMES = {
    "EM_X86_64": "x86_64",
    "EM_386": "i386",
    "EM_S390": "s390",
    "EM_PPC": "ppc",
    "EM_PPC64": "ppc64",
    "EM_AARCH64": "aarch64",
    "EM_ARM": "arm",
    "EM_MIPS": "mips",
}
EXPORT_TYPES = {"__ksymtab": ExportType.PLAIN, "__ksymtab_gpl": ExportType.GPL}
CRC_TABLES = {"__ksymtab": "__kcrctab", "__ksymtab_gpl": "__kcrctab_gpl"}


def _cstr(data: bytes, offset: int = 0) -> str:
    end = data.find(b"\0", offset)
    return data[offset : end if end >= 0 else len(data)].decode()


def reference_read(data: bytes, path: str) -> ModuleInfo:
    """What pyelftools says the loader would read from *data*, computed independently."""
    elf = ELFFile(io.BytesIO(data))
    order = "<" if elf.little_endian else ">"
    by_name = {s.name: s for s in elf.iter_sections()}

    modinfo: list[tuple[str, str]] = []
    for item in by_name[".modinfo"].data().split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            modinfo.append((key.decode(), value.decode()))

    versions: dict[str, int] | None = None
    if "__versions" in by_name:
        versions = {}
        raw = by_name["__versions"].data()
        crc_size = 8 if elf.elfclass == 64 else 4
        for start in range(0, len(raw), 64):
            (crc,) = struct.unpack_from(order + ("Q" if crc_size == 8 else "I"), raw, start)
            versions.setdefault(_cstr(raw[start + crc_size : start + 64]), crc)

    symtab = next(s for s in elf.iter_sections() if isinstance(s, SymbolTableSection))
    undefined: list[str] = []
    weak: list[str] = []
    markers: dict[str, tuple[str, int]] = {}
    namespaces: dict[str, str] = {}
    counts: dict[str, int] = {}
    for sym in symtab.iter_symbols():
        ndx = sym["st_shndx"]
        if ndx == "SHN_UNDEF":
            if sym.name:
                (weak if sym["st_info"]["bind"] == "STB_WEAK" else undefined).append(sym.name)
            continue
        if not isinstance(ndx, int):
            continue
        section = elf.get_section(ndx)
        if section.name in EXPORT_TYPES and sym.name.startswith("__ksymtab_"):
            markers[sym.name[len("__ksymtab_") :]] = (section.name, sym["st_value"])
            counts[section.name] = counts.get(section.name, 0) + 1
        elif section.name == "__ksymtab_strings" and sym.name.startswith("__kstrtabns_"):
            namespaces[sym.name[len("__kstrtabns_") :]] = _cstr(section.data(), sym["st_value"])
    exports = []
    for symbol, (table, value) in markers.items():
        index = value // (by_name[table].data_size // counts[table])
        crc = None
        if CRC_TABLES[table] in by_name:
            (crc,) = struct.unpack_from(order + "I", by_name[CRC_TABLES[table]].data(), index * 4)
        exports.append(ModuleExport(symbol, EXPORT_TYPES[table], namespaces.get(symbol, ""), crc))
    exports.sort(key=lambda e: e.symbol)
    name = next((v for k, v in modinfo if k == "name"), "")
    return ModuleInfo(
        name=name,
        path=path,
        machine=MACHINE_NAMES[elf["e_machine"]],
        modinfo=modinfo,
        versions=versions,
        exports=exports,
        undefined=undefined,
        weak_undefined=weak,
    )


def rich_spec(layout: tuple[int, bool, int], **changes: object) -> ModuleSpec:
    elf_class, big_endian, machine = layout
    spec = ModuleSpec(
        name="rich_mod",
        elf_class=elf_class,
        big_endian=big_endian,
        machine=machine,
        license="Dual BSD/GPL",
        versions=[
            ("module_layout", 0x1A2B3C4D),
            ("_printk", 0x92997ED8),
            ("kmalloc_caches", 0xFFFFFFFF),
            ("usb_register_driver", 0x00000001),
        ],
        undefined=["_printk", "kmalloc_caches", "usb_register_driver"],
        weak=["optional_hook", "another_optional"],
        exports=[
            ExportSpec("rich_plain", crc=0xCAFEBABE),
            ExportSpec("rich_gpl", gpl=True, crc=0x0BADF00D),
            ExportSpec("rich_ns", crc=0x12345678, namespace="RICH_NS"),
            ExportSpec("rich_gpl_ns", gpl=True, crc=0x87654321, namespace="USB_STORAGE"),
            ExportSpec("a_first", crc=0x1),
        ],
        extra_sections=[(".rodata.str1.1", b"hello\0")],
    )
    spec.modinfo = [*spec.all_modinfo, ("import_ns", "USB_STORAGE"), ("alias", "usb:v1234p*")]
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_read_module_matches_pyelftools(layout: tuple[int, bool, int]) -> None:
    data = build_module(rich_spec(layout))
    got = read_module(data, "drivers/x/rich_mod.ko")
    assert got == reference_read(data, "drivers/x/rich_mod.ko")
    # And against what the spec said, so the reference itself is checked too.
    assert got.versions is not None and got.versions["_printk"] == 0x92997ED8
    assert got.undefined == ["_printk", "kmalloc_caches", "usb_register_driver"]
    assert got.weak_undefined == ["optional_hook", "another_optional"]
    assert got.import_ns == ["USB_STORAGE"]
    assert got.license == "Dual BSD/GPL"
    exports = {e.symbol: e for e in got.exports}
    assert exports["rich_gpl_ns"] == ModuleExport(
        "rich_gpl_ns", ExportType.GPL, "USB_STORAGE", 0x87654321
    )
    assert exports["rich_plain"] == ModuleExport("rich_plain", ExportType.PLAIN, "", 0xCAFEBABE)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_module_without_exports_or_versions(layout: tuple[int, bool, int]) -> None:
    elf_class, big_endian, machine = layout
    spec = ModuleSpec(elf_class=elf_class, big_endian=big_endian, machine=machine,
                      versions=None, undefined=["printk"], weak=["maybe"])
    data = build_module(spec)
    got = read_module(data, "synth.ko")
    assert got == reference_read(data, "synth.ko")
    assert got.versions is None
    assert got.exports == []
    assert got.undefined == ["printk"]
    assert got.weak_undefined == ["maybe"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_exports_without_crcs(layout: tuple[int, bool, int]) -> None:
    data = build_module(rich_spec(layout, kcrctab=False))
    got = read_module(data, "m.ko")
    assert got == reference_read(data, "m.ko")
    assert all(e.crc is None for e in got.exports)


def test_exports_without_namespace_markers() -> None:
    spec = ModuleSpec(namespace_markers=False,
                      exports=[ExportSpec("plain", crc=7), ExportSpec("ns", crc=8, namespace="N")])
    got = read_module(build_module(spec), "m.ko")
    assert [(e.symbol, e.namespace, e.crc) for e in got.exports] == [
        ("ns", "N", 8), ("plain", "", 7)
    ]


def test_section_names_without_tail_merging() -> None:
    data = build_module(rich_spec(LAYOUTS[0], tail_merge_names=False))
    assert read_module(data, "m.ko") == reference_read(data, "m.ko")


def test_name_falls_back_to_the_file_name() -> None:
    spec = ModuleSpec(modinfo=[("license", "GPL"), ("vermagic", "6.1.0 SMP ")])
    got = read_module(build_module(spec), "/lib/modules/x/kernel/my-driver.ko")
    assert got.name == "my_driver"


def test_unknown_machine_is_named_by_number() -> None:
    got = read_module(build_module(ModuleSpec(machine=4242)), "m.ko")
    assert got.machine == "machine-4242"


def test_aarch64_machine() -> None:
    assert read_module(build_module(ModuleSpec(machine=EM_AARCH64)), "m.ko").machine == "aarch64"


def test_versions_keep_the_whole_unsigned_long_on_64_bit() -> None:
    spec = ModuleSpec(versions=[("module_layout", 0x1_0000_1234)], machine=EM_X86_64)
    got = read_module(build_module(spec), "m.ko")
    assert got.versions == {"module_layout": 0x1_0000_1234}


def test_duplicate_versions_entry_first_one_counts() -> None:
    spec = ModuleSpec(versions=[("module_layout", 1), ("printk", 0xAAAA), ("printk", 0xBBBB)])
    got = read_module(build_module(spec), "m.ko")
    assert got.versions is not None and got.versions["printk"] == 0xAAAA


# ---------------------------------------------------------------------------
# Property: any module the writer can produce reads as pyelftools reads it.

_symbol = st.from_regex(r"[a-z_][a-z0-9_]{0,30}", fullmatch=True)
_crc = st.integers(min_value=0, max_value=0xFFFFFFFF)
_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="="),
    max_size=20,
)


@st.composite
def module_specs(draw: st.DrawFn) -> ModuleSpec:
    elf_class, big_endian, machine = draw(st.sampled_from(LAYOUTS))
    names = draw(st.lists(_symbol, unique=True, max_size=24))
    cut1 = draw(st.integers(0, len(names)))
    cut2 = draw(st.integers(cut1, len(names)))
    undefined, weak, exported = names[:cut1], names[cut1:cut2], names[cut2:]
    exports = [
        ExportSpec(s, gpl=draw(st.booleans()), crc=draw(_crc),
                   namespace=draw(st.sampled_from(["", "NS_A", "USB_STORAGE"])))
        for s in exported
    ]
    has_versions = draw(st.booleans())
    versions = [(s, draw(_crc)) for s in undefined] if has_versions else None
    modinfo = draw(st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), _text),
                            max_size=6))
    return ModuleSpec(
        name="prop", elf_class=elf_class, big_endian=big_endian, machine=machine,
        modinfo=[("name", "prop"), *modinfo], versions=versions, undefined=undefined,
        weak=weak, exports=exports, kcrctab=draw(st.booleans()),
        namespace_markers=draw(st.booleans()), tail_merge_names=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(module_specs())
def test_property_read_module_matches_pyelftools(spec: ModuleSpec) -> None:
    data = build_module(spec)
    assert read_module(data, "prop.ko") == reference_read(data, "prop.ko")


# ---------------------------------------------------------------------------
# Compressed modules read exactly like the plain file.


def _zstd_streamed(data: bytes) -> bytes:
    """As zstd(1) writes when streaming: no content size in the frame header."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=19).stream_writer(out, closefd=False) as writer:
        writer.write(data)
    return out.getvalue()


def _zstd_two_frames(data: bytes) -> bytes:
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


COMPRESSORS = {
    "xz": (".ko.xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    "zstd": (".ko.zst", lambda d: zstandard.ZstdCompressor().compress(d)),
    "zstd-streamed": (".ko.zst", _zstd_streamed),
    "zstd-two-frames": (".ko.zst", _zstd_two_frames),
    "gzip": (".ko.gz", gzip.compress),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_module_reads_like_the_plain_file(
    tmp_path: Path, kind: str, layout: tuple[int, bool, int]
) -> None:
    suffix, compress = COMPRESSORS[kind]
    plain = build_module(rich_spec(layout))
    packed = compress(plain)
    assert compression_of(packed) == kind.split("-")[0]
    assert decompress(packed, "x") == plain
    (tmp_path / "rich_mod.ko").write_bytes(plain)
    (tmp_path / f"rich_mod{suffix}").write_bytes(packed)
    a = read_module_file(tmp_path / "rich_mod.ko")
    b = read_module_file(tmp_path / f"rich_mod{suffix}")
    assert a.sha256 != b.sha256  # the digest is of the file as stored
    assert dataclasses.replace(b, path=a.path, sha256=a.sha256) == a


def test_plain_data_passes_through_decompress() -> None:
    data = build_module(ModuleSpec())
    assert compression_of(data) is None
    assert decompress(data, "x") is data


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_truncated_compressed_module_is_a_user_error(kind: str) -> None:
    _suffix, compress = COMPRESSORS[kind]
    packed = compress(build_module(rich_spec(LAYOUTS[0])))
    with pytest.raises(UserError, match=r"^where\.ko: "):
        # Either decompress notices, or the ELF reader does; never another exception.
        read_module(decompress(packed[: len(packed) // 2], "where.ko"), "where.ko")


def test_truncated_zstd_is_reported_by_decompress() -> None:
    packed = _zstd_streamed(build_module(rich_spec(LAYOUTS[0])))
    with pytest.raises(UserError, match="corrupt zstd"):
        decompress(packed[: len(packed) // 2], "where.ko.zst")


# ---------------------------------------------------------------------------
# Bad input: UserError naming the file, never another exception.

BAD_FILES = {
    "not-elf": lambda: b"hello, world, definitely not an ELF file" * 3,
    "empty": lambda: b"",
    "magic-only": lambda: b"\x7fELF",
    "short-header": lambda: build_module(ModuleSpec())[:60],
    "truncated-sections": lambda: build_module(ModuleSpec(truncate_to=400)),
    "truncated-end": lambda: build_module(ModuleSpec())[:-1],
    "executable": lambda: build_module(ModuleSpec(e_type=2)),
    "bad-class": lambda: b"\x7fELF\x03\x01\x01" + b"\0" * 100,
    "bad-shentsize": lambda: build_module(ModuleSpec(shentsize=12)),
    "bad-shstrndx": lambda: build_module(ModuleSpec(shstrndx=999)),
    "versions-not-whole": lambda: build_module(ModuleSpec(versions_extra_bytes=5)),
    "section-past-end": lambda: build_module(
        ModuleSpec(section_size_override={".modinfo": 1 << 20})),
    "offset-past-end": lambda: build_module(
        ModuleSpec(section_offset_override={"__versions": 1 << 30})),
    "symtab-bad-link": lambda: build_module(ModuleSpec(symtab_link=999)),
    "no-modinfo": lambda: build_module(ModuleSpec())
    .replace(b".modinfo\0", b".modinfX\0"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_a_user_error_naming_it(kind: str) -> None:
    with pytest.raises(UserError) as info:
        read_module(BAD_FILES[kind](), "some/dir/bad.ko")
    assert info.value.where == "some/dir/bad.ko"
    assert str(info.value).startswith("some/dir/bad.ko: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["xz", "zstd", "gzip"])
def test_corrupt_compressed_data_is_a_user_error(kind: str) -> None:
    magic = {"xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd", "gzip": b"\x1f\x8b"}[kind]
    with pytest.raises(UserError, match=rf"^m\.ko\.x: corrupt {kind} data"):
        decompress(magic + b"\x00garbage" * 8, "m.ko.x")


# ---------------------------------------------------------------------------
# The reference tools of the field agree too (kmod's modprobe and modinfo).


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_versions_match_modprobe_dump_modversions(
    tmp_path: Path, layout: tuple[int, bool, int]
) -> None:
    modprobe = require_tool("modprobe")
    path = tmp_path / "rich_mod.ko"
    path.write_bytes(build_module(rich_spec(layout)))
    proc = subprocess.run([modprobe, "--dump-modversions", str(path)],
                          capture_output=True, text=True, check=True)
    got = read_module(path.read_bytes(), str(path))
    assert got.versions is not None
    assert proc.stdout == "".join(f"0x{crc:08x}\t{name}\n" for name, crc in got.versions.items())


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_modinfo_matches_modinfo_tool(tmp_path: Path, layout: tuple[int, bool, int]) -> None:
    modinfo = require_tool("modinfo")
    path = tmp_path / "rich_mod.ko"
    path.write_bytes(build_module(rich_spec(layout)))
    got = read_module(path.read_bytes(), str(path))
    for key in ("license", "vermagic", "name", "import_ns", "alias"):
        proc = subprocess.run([modinfo, "-F", key, str(path)],
                              capture_output=True, text=True, check=True)
        assert proc.stdout.splitlines() == got.modinfo_values(key), key
