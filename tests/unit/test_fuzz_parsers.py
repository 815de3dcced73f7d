"""Bad input never escapes as anything but a KmodgateError (issue 2).

Random bytes, and random mutations and truncations of valid synthesized
modules, go into every parser of untrusted input.  A parser may return
normally or raise a kmodgate.errors.KmodgateError subclass; an IndexError,
struct.error, UnicodeDecodeError (or any other exception) is a bug.
"""

from __future__ import annotations

import gzip
import lzma
from collections.abc import Callable
from typing import TypeVar

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elfwriter import LAYOUTS, ExportSpec, ModuleSpec, build_module
from kmodgate.abi.compression import GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC, decompress
from kmodgate.abi.elf import read_module
from kmodgate.abi.kconfig import parse_config
from kmodgate.abi.stablelist import parse_stablelist
from kmodgate.abi.symvers import parse_symvers
from kmodgate.errors import KmodgateError

T = TypeVar("T")
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def only_kmodgate_errors(parse: Callable[[], T]) -> T | None:
    try:
        return parse()
    except KmodgateError as exc:
        assert str(exc)  # a message a person can act on
        assert "\n" not in exc.message
        return None


def _valid_modules() -> list[bytes]:
    out = []
    for elf_class, big_endian, machine in LAYOUTS:
        out.append(build_module(ModuleSpec(
            elf_class=elf_class, big_endian=big_endian, machine=machine,
            versions=[("module_layout", 1), ("_printk", 2), ("kfree", 3)],
            undefined=["_printk", "kfree"], weak=["maybe"],
            exports=[ExportSpec("a_fn", crc=5), ExportSpec("b_fn", gpl=True, crc=6,
                                                           namespace="NS")],
        )))
    return out


VALID = _valid_modules()


@st.composite
def mutated_modules(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[pos] = draw(st.integers(0, 255))
        else:  # a 4-byte field set to an extreme value (offsets, sizes, indexes)
            word = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff",
                                         b"\0\0\0\x40", b"\x40\0\0\0"]))
            data[pos : pos + 4] = word
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_read_module_random_bytes(data: bytes) -> None:
    only_kmodgate_errors(lambda: read_module(data, "fuzz.ko"))
    only_kmodgate_errors(lambda: read_module(b"\x7fELF" + data, "fuzz.ko"))


@FUZZ
@given(st.sampled_from(VALID), st.binary(min_size=1, max_size=64))
def test_read_module_random_body_after_valid_header(valid: bytes, tail: bytes) -> None:
    cut = 64 if valid[4] == 2 else 52
    data = valid[:cut] + tail * (len(valid) // len(tail))
    only_kmodgate_errors(lambda: read_module(data, "fuzz.ko"))


@FUZZ
@given(mutated_modules())
def test_read_module_mutated_valid_module(data: bytes) -> None:
    only_kmodgate_errors(lambda: read_module(data, "fuzz.ko"))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_read_module_every_truncation(valid: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid) - 1))
    only_kmodgate_errors(lambda: read_module(valid[:cut], "fuzz.ko"))


@FUZZ
@given(st.sampled_from([XZ_MAGIC, ZSTD_MAGIC, GZIP_MAGIC, b""]), st.binary(max_size=512))
def test_decompress_random_bytes(magic: bytes, body: bytes) -> None:
    only_kmodgate_errors(lambda: decompress(magic + body, "fuzz.ko.x"))


_PACKED = [
    lzma.compress(VALID[0], format=lzma.FORMAT_XZ),
    zstandard.ZstdCompressor().compress(VALID[0]),
    gzip.compress(VALID[0]),
]


@FUZZ
@given(st.sampled_from(_PACKED), st.data())
def test_decompress_then_read_mutated_compressed_module(packed: bytes, data: st.DataObject) -> None:
    buf = bytearray(packed)
    for _ in range(data.draw(st.integers(0, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(0, len(buf))) :]

    def both() -> object:
        return read_module(decompress(bytes(buf), "fuzz.ko.x"), "fuzz.ko.x")

    only_kmodgate_errors(both)


_symvers_line = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["0x1", "0x12345678", "0xzz", "sym", "", "vmlinux",
                              "EXPORT_SYMBOL", "EXPORT_SYMBOL_GPL", "NS", "0x", "-0x1",
                              "0x1ffffffff", "\x00", "é"]),
             max_size=7).map("\t".join),
)


@FUZZ
@given(st.lists(_symvers_line, max_size=8).map("\n".join))
def test_parse_symvers_random_text(text: str) -> None:
    only_kmodgate_errors(lambda: parse_symvers(text, "Module.symvers"))


@FUZZ
@given(st.binary(max_size=1024))
def test_parse_symvers_random_bytes_decoded_as_kmodgate_does(raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    only_kmodgate_errors(lambda: parse_symvers(text, "Module.symvers"))


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.sampled_from(["[rhel9_x86_64_stablelist]", "\tsym", "[", "[]",
                                           "# c", "\t", "[a] b"])), max_size=10).map("\n".join))
def test_parse_stablelist_random_text(text: str) -> None:
    only_kmodgate_errors(lambda: parse_stablelist(text, "kabi_stablelist"))


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.sampled_from(['CONFIG_X="', 'CONFIG_X=""', "CONFIG_=", "CONFIG_X",
                                           'CONFIG_X="a\\"b"', "CONFIG_SMP=y"])),
                max_size=10).map("\n".join))
def test_parse_config_random_text(text: str) -> None:
    config = only_kmodgate_errors(lambda: parse_config(text))
    assert config is not None
    assert all(k.startswith("CONFIG_") for k in config)
