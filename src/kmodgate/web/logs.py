"""Check logs as the pages show them: read from the path the store recorded
for a result (never from a path in the request), decompressed, searchable.

Search is a plain case-insensitive substring, done here so it works without
JavaScript; the template escapes every piece, so a log line is only ever text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmodgate.abi.compression import decompress
from kmodgate.errors import KmodgateError, UserError

MAX_LOG_BYTES = 64 * 1024 * 1024  # a build log far larger than this is not worth a page
MAX_SHOWN_LINES = 20_000


@dataclass
class LogLine:
    number: int
    parts: list[tuple[str, bool]]  # (text, matched): matched pieces get highlighted


def read_log(result_id: int, log_path: str | None) -> str:
    if not log_path:
        raise UserError(f"no log for result {result_id}: the check kept none")
    path = Path(log_path)
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_LOG_BYTES:
            raw = raw[:MAX_LOG_BYTES]
        data = decompress(raw, str(path))
    except FileNotFoundError:
        raise UserError(f"no log for result {result_id}: the file is gone from the "
                        "cache") from None
    except (OSError, KmodgateError) as exc:
        raise UserError(f"no log for result {result_id}: cannot read it "
                        f"({type(exc).__name__})") from None
    return data[:MAX_LOG_BYTES].decode("utf-8", "replace")


def search_log(text: str, query: str) -> tuple[list[LogLine], int, bool]:
    """The lines to show (all, or those matching *query*), how many matched,
    and whether the list was cut short."""
    needle = query.casefold()
    shown: list[LogLine] = []
    matched = 0
    truncated = False
    for number, line in enumerate(text.splitlines(), start=1):
        if needle:
            parts = _split_matches(line, needle)
            if parts is None:
                continue
            matched += 1
        else:
            parts = [(line, False)]
        if len(shown) >= MAX_SHOWN_LINES:
            truncated = True
            continue
        shown.append(LogLine(number, parts))
    return shown, matched, truncated


def _split_matches(line: str, needle: str) -> list[tuple[str, bool]] | None:
    folded = line.casefold()
    if len(folded) != len(line):  # casefold changed lengths (ß -> ss): no highlight
        return [(line, False)] if needle in folded else None
    parts: list[tuple[str, bool]] = []
    start = 0
    while True:
        i = folded.find(needle, start)
        if i < 0:
            break
        if i > start:
            parts.append((line[start:i], False))
        parts.append((line[i:i + len(needle)], True))
        start = i + len(needle)
    if not parts:
        return None
    if start < len(line):
        parts.append((line[start:], False))
    return parts
