"""RHEL kABI stablelists: parsing, malformed input, and the written layout (golden file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodgate.abi.stablelist import Stablelist, format_stablelist, parse_stablelist
from kmodgate.errors import UserError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def test_parse_rhel_layout() -> None:
    text = "[rhel9_x86_64_stablelist]\n\t__alloc_pages\n\tkmalloc_caches\n\tusb_register_driver\n"
    listed = parse_stablelist(text, "kabi_stablelist_x86_64")
    assert listed == Stablelist(
        ("rhel9_x86_64_stablelist",),
        frozenset({"__alloc_pages", "kmalloc_caches", "usb_register_driver"}),
    )


def test_comments_blank_lines_and_several_sections() -> None:
    text = "# generated\n\n[a]\n\tx\n\n[b]\n  y\n\tx\n"
    listed = parse_stablelist(text, "w")
    assert listed.sections == ("a", "b")
    assert listed.symbols == frozenset({"x", "y"})


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("\tsym\n", "w:1"),
        ("# c\n[ok]\n\ttwo words\n", "w:3"),
        ("[ok]\n[broken\n", "w:2"),
        ("[]\n", "w:1"),
    ],
)
def test_malformed_is_named_by_line(text: str, where: str) -> None:
    with pytest.raises(UserError) as info:
        parse_stablelist(text, "w")
    assert info.value.where == where
    assert str(info.value).startswith(f"{where}: malformed stablelist")


def test_no_section_at_all() -> None:
    with pytest.raises(UserError, match=r"^w: not a kABI stablelist"):
        parse_stablelist("# only a comment\n\n", "w")


def test_format_stablelist_matches_golden_file() -> None:
    symbols = ["__alloc_pages", "__kmalloc", "kmalloc_caches", "pci_register_driver",
               "usb_register_driver"]
    text = format_stablelist("rhel9_x86_64_stablelist", symbols)
    assert text == (GOLDEN / "kabi_stablelist_x86_64").read_text()
    assert parse_stablelist(text, "golden") == Stablelist(
        ("rhel9_x86_64_stablelist",), frozenset(symbols)
    )
