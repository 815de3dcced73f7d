"""The first real error of a kbuild log, classified.

A failed module build prints dozens of lines, most of them consequences:
``control reaches end of non-void function`` after a call that no longer
compiles, ``cc1: some warnings being treated as errors``, make's ``Error 1``
chain.  A maintainer wants the one line that says what the kernel changed:
"implicit declaration of function strlcpy", "struct block_device has no member
bd_inode".  This module finds it.  It is a pure function over text.

The patterns are gcc's and modpost's diagnostic texts, as data.  gcc quotes
names with ‘…’ in a UTF-8 locale and '…' in the C locale; both are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# A quoted name in a gcc diagnostic, in either quoting style.
_Q = r"[‘'`\"](?P<{name}>[^’'`\"]+)[’'`\"]"


def _q(name: str) -> str:
    return _Q.format(name=name)


# (code, pattern over the diagnostic's message).  The first pattern that
# matches names the error; a gcc error no pattern knows is "compile_error".
# Groups: symbol, member, struct, header.
MESSAGE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern))
    for code, pattern in (
        ("implicit_declaration", r"implicit declaration of function " + _q("symbol")),
        (
            "missing_member",
            r"[‘'](?P<struct>(?:struct|union) [^’']+)[’'] has no member named " + _q("member"),
        ),
        ("too_few_arguments", r"too few arguments to function " + _q("symbol")),
        ("too_many_arguments", r"too many arguments to function " + _q("symbol")),
        ("undeclared_identifier", _q("symbol") + r" undeclared"),
        ("unknown_type", r"unknown type name " + _q("symbol")),
        ("conflicting_types", r"conflicting types for " + _q("symbol")),
        (
            "incomplete_type",
            r"(?:invalid use of undefined type|dereferencing pointer to incomplete type|"
            r"has incomplete type|storage size of .* isn.t known)"
            r"(?: [‘'](?P<struct>(?:struct|union|enum) [^’']+)[’'])?",
        ),
        ("incompatible_pointer_type", r"incompatible pointer type"),
        ("macro_arguments", r"macro [\"‘'](?P<symbol>\w+)[\"’'] (?:passed|requires)"),
        ("incompatible_types", r"incompatible type"),
    )
)

# A gcc (or cc1/as) diagnostic: file:line[:col]: [fatal ]error: message
_DIAG_RE = re.compile(
    r"^(?P<file>[^\s:][^:]*?):(?P<line>\d+)(?::(?P<col>\d+))?: "
    r"(?P<severity>fatal error|error): (?P<message>.*)$"
)
# gcc's missing include: "foo.c:2:10: fatal error: linux/genhd.h: No such file or directory"
_HEADER_RE = re.compile(r"^(?P<header>\S+): No such file or directory")
# modpost (scripts/mod/modpost.c): 'ERROR: modpost: "sym" [path/mod.ko] undefined!'
_MODPOST_UNDEF_RE = re.compile(
    r'^(?:ERROR|WARNING): modpost: "(?P<symbol>[^"]+)" \[(?P<file>[^\]]+)\] undefined!'
)
_MODPOST_ERR_RE = re.compile(r"^ERROR: modpost: (?P<message>.*)$")
# The linker, for Makefiles that also build user-space helpers.
_LD_UNDEF_RE = re.compile(
    r"^(?P<file>[^:\s]+):(?:\(.*?\)|[^:]*):? ?undefined reference to [`'‘](?P<symbol>[^'’]+)['’]"
)
# The shell make runs: "/bin/sh: 1: pahole: not found", "bash: line 1: foo: command not found".
_NOT_FOUND_RE = re.compile(
    r"^(?:/bin/sh|/usr/bin/sh|sh|/bin/bash|bash)(?:: line)?(?:: \d+)?: (?P<symbol>[^:\s]+): "
    r"(?:command )?not found"
)
# make running a recipe's program directly: "make: pahole: No such file or directory"
_MAKE_EXEC_RE = re.compile(r"^make(?:\[\d+\])?: (?P<symbol>[^\s:*]+): No such file or directory$")
# make itself: "make: *** No rule to make target 'x', needed by 'y'.  Stop."
_MAKE_STOP_RE = re.compile(r"^make(?:\[\d+\])?: \*\*\* (?P<message>(?!\[).*Stop\.)$")
_MAKEFILE_MISSING_RE = re.compile(
    r"^(?P<file>\S*[Mm]akefile[^:]*):(?P<line>\d+): (?P<message>.*: No such file or directory)$"
)

# Errors that only follow from an earlier one; chosen only when nothing else
# is in the log.
CONSEQUENTIAL = (
    re.compile(r"control reaches end of non-void function"),
    re.compile(r"some warnings being treated as errors"),
)


@dataclass(frozen=True, slots=True)
class BuildError:
    """The error that made a build fail, as a maintainer would quote it."""

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    symbol: str | None = None
    member: str | None = None
    struct: str | None = None
    header: str | None = None

    def to_reason(self) -> dict[str, Any]:
        """The CheckResult reason for this error."""
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "symbol": self.symbol,
            "file": self.file,
            "line": self.line,
        }
        for key in ("member", "struct", "header"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def classify_log(text: str, *, strip_prefixes: Sequence[str] = ()) -> BuildError | None:
    """The first real error in a kbuild log, or None if the log shows none.

    *strip_prefixes* are directories (the build directory) removed from the
    front of file names, so a result names "driver/razerkbd_driver.c" rather
    than a scratch path.
    """
    found: list[BuildError] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        error = _classify_line(line)
        if error is None:
            continue
        if not any(p.search(error.message) for p in CONSEQUENTIAL):
            return _relative(error, strip_prefixes)
        found.append(error)
    return _relative(found[0], strip_prefixes) if found else None


def _classify_line(line: str) -> BuildError | None:
    m = _DIAG_RE.match(line)
    if m:
        return _classify_diagnostic(m.group("file"), int(m.group("line")), m.group("message"))
    m = _MODPOST_UNDEF_RE.match(line)
    if m:
        symbol = m.group("symbol")
        return BuildError(
            "modpost_undefined",
            f"modpost: {symbol} is undefined: no kernel export provides it",
            file=m.group("file"),
            symbol=symbol,
        )
    m = _MODPOST_ERR_RE.match(line)
    if m:
        return BuildError("modpost_error", f"modpost: {m.group('message')}")
    m = _LD_UNDEF_RE.match(line)
    if m:
        return BuildError(
            "link_undefined",
            f"undefined reference to {m.group('symbol')}",
            file=m.group("file"),
            symbol=m.group("symbol"),
        )
    m = _NOT_FOUND_RE.match(line) or _MAKE_EXEC_RE.match(line)
    if m:
        return BuildError(
            "command_not_found", f"{m.group('symbol')}: command not found", symbol=m.group("symbol")
        )
    m = _MAKEFILE_MISSING_RE.match(line)
    if m:
        return BuildError(
            "make_error", m.group("message"), file=m.group("file"), line=int(m.group("line"))
        )
    m = _MAKE_STOP_RE.match(line)
    if m:
        return BuildError("make_error", m.group("message"))
    return None


def _classify_diagnostic(file: str, line: int, message: str) -> BuildError:
    clean = _strip_option(message)
    m = _HEADER_RE.match(clean)
    if m:
        header = m.group("header")
        return BuildError(
            "missing_header", f"missing header {header}", file=file, line=line, header=header
        )
    for code, pattern in MESSAGE_PATTERNS:
        pm = pattern.search(clean)
        if pm is None:
            continue
        groups = {k: v for k, v in pm.groupdict().items() if v is not None}
        return BuildError(
            code,
            _plain_quotes(clean),
            file=file,
            line=line,
            symbol=groups.get("symbol"),
            member=groups.get("member"),
            struct=groups.get("struct"),
        )
    return BuildError("compile_error", _plain_quotes(clean), file=file, line=line)


def _strip_option(message: str) -> str:
    """The message without gcc's trailing "[-Werror=...]" option tag."""
    return re.sub(r"\s*\[-W[^\]]*\]$", "", message)


def _plain_quotes(message: str) -> str:
    return message.replace("‘", "'").replace("’", "'")


def _relative(error: BuildError, prefixes: Sequence[str]) -> BuildError:
    if error.file is None:
        return error
    for prefix in sorted(prefixes, key=len, reverse=True):
        p = prefix.rstrip("/") + "/"
        if error.file.startswith(p):
            return BuildError(
                error.code,
                error.message,
                error.file[len(p):],
                error.line,
                error.symbol,
                error.member,
                error.struct,
                error.header,
            )
    return error
