"""Module.symvers: both column layouts, malformed lines named by line, round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodgate.abi.model import Export, ExportType
from kmodgate.abi.symvers import format_symvers, parse_symvers
from kmodgate.errors import UserError

FIVE = (
    "0x92997ed8\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n"
    "0x1a2b3c4d\tusb_stor_probe\tdrivers/usb/storage/usb-storage\tEXPORT_SYMBOL_GPL"
    "\tUSB_STORAGE\n"
)
FOUR = "0x92997ed8\t_printk\tvmlinux\tEXPORT_SYMBOL\n0x00000000\tx\tfs/y\tEXPORT_SYMBOL_GPL\n"


def test_five_columns() -> None:
    exports = parse_symvers(FIVE, "Module.symvers")
    assert exports == {
        "_printk": Export("_printk", 0x92997ED8, "vmlinux", ExportType.PLAIN, ""),
        "usb_stor_probe": Export("usb_stor_probe", 0x1A2B3C4D,
                                 "drivers/usb/storage/usb-storage", ExportType.GPL,
                                 "USB_STORAGE"),
    }
    assert exports["usb_stor_probe"].provider_module == "usb_storage"
    assert exports["_printk"].provider_module is None


def test_four_columns() -> None:
    exports = parse_symvers(FOUR, "Module.symvers")
    assert exports["_printk"] == Export("_printk", 0x92997ED8, "vmlinux", ExportType.PLAIN)
    assert exports["x"].crc == 0 and exports["x"].export_type is ExportType.GPL


def test_blank_lines_and_crlf_are_fine() -> None:
    text = "\n" + FIVE.replace("\n", "\r\n") + "\n\n"
    assert parse_symvers(text, "w") == parse_symvers(FIVE, "w")


def test_empty_file_has_no_exports() -> None:
    assert parse_symvers("", "w") == {}


GOOD = "0x00000001\ta\tvmlinux\tEXPORT_SYMBOL\t\n"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("0x00000001\tonly_three\tvmlinux", "expected 4 or 5"),
        ("0x00000001 a vmlinux EXPORT_SYMBOL", "found 1"),
        ("0x1\ta\tvmlinux\tEXPORT_SYMBOL\t\textra", "found 6"),
        ("00000001\ta\tvmlinux\tEXPORT_SYMBOL\t", "bad CRC"),
        ("0xZZ\ta\tvmlinux\tEXPORT_SYMBOL\t", "bad CRC"),
        ("0x100000000\ta\tvmlinux\tEXPORT_SYMBOL\t", "bad CRC"),
        ("0x1\ta\tvmlinux\tEXPORT_SYMBOL_GPL_FUTURE\t", "bad export type"),
        ("0x1\ta\tvmlinux\tunknown\t", "bad export type"),
        ("0x1\t\tvmlinux\tEXPORT_SYMBOL\t", "empty symbol or provider"),
        ("0x1\ta\t\tEXPORT_SYMBOL\t", "empty symbol or provider"),
    ],
)
def test_malformed_line_names_where_and_line(bad_line: str, message: str) -> None:
    text = GOOD + GOOD.replace("\ta\t", "\tb\t") + bad_line + "\n" + GOOD
    with pytest.raises(UserError) as info:
        parse_symvers(text, "/some/Module.symvers")
    assert str(info.value).startswith("/some/Module.symvers:3: ")
    assert info.value.where == "/some/Module.symvers:3"
    assert message in str(info.value)


def test_line_numbers_count_blank_lines() -> None:
    with pytest.raises(UserError, match=r"^w:4: "):
        parse_symvers(GOOD + "\n\nbroken\n", "w")


def test_format_symvers_round_trip() -> None:
    exports = parse_symvers(FIVE, "w")
    text = format_symvers(exports)
    assert text == FIVE
    assert parse_symvers(text, "w") == exports


def test_format_symvers_writes_four_column_input_as_five() -> None:
    exports = parse_symvers(FOUR, "w")
    assert parse_symvers(format_symvers(exports), "w") == exports
    assert all(line.count("\t") == 4 for line in format_symvers(exports).splitlines())


_symbol = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,40}", fullmatch=True)
_export = st.builds(
    Export,
    symbol=_symbol,
    crc=st.integers(0, 0xFFFFFFFF),
    provider=st.sampled_from(["vmlinux", "drivers/a/b-c", "fs/ext4/ext4"]),
    export_type=st.sampled_from([ExportType.PLAIN, ExportType.GPL]),
    namespace=st.sampled_from(["", "USB_STORAGE", "CXL"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_export, unique_by=lambda e: e.symbol, max_size=20))
def test_property_format_then_parse_is_identity(items: list[Export]) -> None:
    exports = {e.symbol: e for e in items}
    assert parse_symvers(format_symvers(exports), "w") == exports
