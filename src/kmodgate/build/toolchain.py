"""Which compiler builds modules for a kernel: the one the kernel was built with.

A kernel records its compiler in ``CONFIG_CC_VERSION_TEXT`` (the first line of
``$(CC) --version`` at configure time, Linux commit 8b59cd81dc5e ("kbuild:
ensure full rebuild when the compiler is updated") (v5.8)).  Modules built with
another compiler may miscompile against the kernel's structure layouts or use
flags the kernel's compiler never saw, so kmodgate looks for exactly that
compiler on the host and says so in the result when it is not there.  What
happens then is configuration: report ``error`` (the default: it is the
machine that is missing something, not the module that is broken), or build
with a named substitute and record that it was one.

Knowing how a version text names a compiler command is data
(``COMPILER_FAMILIES``), with an explicit fallback for texts no row matches.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from enum import StrEnum

from kmodgate.errors import UserError


@dataclass(frozen=True, slots=True)
class CompilerFamily:
    """How one compiler family's ``--version`` first line reads.

    *pattern* matches CONFIG_CC_VERSION_TEXT; group ``command`` is the program
    the kernel's build ran (the text starts with it), group ``version`` its
    release.  *make_vars* are the make variables that select the family in
    kbuild (clang-built kernels are built with LLVM=1).
    """

    name: str
    pattern: re.Pattern[str]
    make_vars: tuple[tuple[str, str], ...] = ()


COMPILER_FAMILIES: tuple[CompilerFamily, ...] = (
    # "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0",
    # "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0",
    # "gcc (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)"
    CompilerFamily(
        "gcc",
        re.compile(
            r"^(?P<command>(?:[\w.+-]+-)?gcc(?:-\d+(?:\.\d+)*)?) \(.*?\) "
            r"(?P<version>\d+\.\d+(?:\.\d+)?)"
        ),
    ),
    # "Debian clang version 16.0.6 (15)", "clang version 17.0.6 (Fedora 17.0.6-2.fc39)"
    CompilerFamily(
        "clang",
        re.compile(r"^(?:.*? )?(?P<command>clang) version (?P<version>\d+\.\d+(?:\.\d+)?)"),
        make_vars=(("LLVM", "1"),),
    ),
)


class Match(StrEnum):
    EXACT = "exact"  # the host compiler prints the kernel's version text
    SAME_VERSION = "same-version"  # same release, other packaging revision
    SUBSTITUTE = "substitute"  # configuration named another compiler
    MISSING = "missing"  # nothing suitable on the host


class OnMissing(StrEnum):
    ERROR = "error"
    SUBSTITUTE = "substitute"


@dataclass(frozen=True, slots=True)
class ToolchainPolicy:
    """What to do when the kernel's own compiler is not on the host.

    ``on_missing=SUBSTITUTE`` builds with *substitute* (a command such as
    ``gcc-13``) and records that it did; ``ERROR`` reports the cell as an
    infrastructure error naming the compiler the host lacks.
    """

    on_missing: OnMissing = OnMissing.ERROR
    substitute: str | None = None

    def __post_init__(self) -> None:
        if self.on_missing is OnMissing.SUBSTITUTE and not self.substitute:
            raise UserError("a substitute compiler policy needs the compiler's command name")


@dataclass(frozen=True, slots=True)
class Toolchain:
    """The compiler chosen for one kernel, and how well it matches the kernel's."""

    wanted: str | None  # CONFIG_CC_VERSION_TEXT
    family: str | None
    command: str | None  # the program to run, None when MISSING
    version_text: str | None  # what the program prints as its --version first line
    match: Match
    make_vars: tuple[tuple[str, str], ...] = ()

    @property
    def usable(self) -> bool:
        return self.command is not None

    def describe(self) -> str:
        """One line for CheckResult.toolchain."""
        if self.command is None:
            return f"missing: {self.wanted or 'unknown compiler'}"
        text = self.version_text or self.command
        if self.match is Match.SUBSTITUTE:
            return f"{text} (substitute for {self.wanted})"
        return text


def parse_cc_version_text(text: str) -> tuple[CompilerFamily, str, str] | None:
    """(family, command, version) of a CONFIG_CC_VERSION_TEXT, or None if no row knows it."""
    for family in COMPILER_FAMILIES:
        m = family.pattern.match(text)
        if m:
            return family, m.group("command"), m.group("version")
    return None


@functools.lru_cache(maxsize=64)
def version_line(command: str) -> str | None:
    """The first line of ``command --version``, or None if there is no such program."""
    path = shutil.which(command)
    if path is None:
        return None
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=False, timeout=30,
            env={"LC_ALL": "C", "PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def _after_command(text: str, command: str) -> str:
    """The version text without its leading program name, which differs by how it was run."""
    return text[len(command):].strip() if text.startswith(command) else text


def select_toolchain(cc_version_text: str | None, policy: ToolchainPolicy) -> Toolchain:
    """The compiler to build modules for a kernel whose .config says *cc_version_text*.

    Candidates, in order: the exact program the kernel ran; the same program
    without its target prefix; ``<family>-<major>``; ``<family>``.  The first
    that prints the same version text is an exact match; otherwise the first
    of the same release is accepted as SAME_VERSION (a distribution rebuild
    of the same compiler).  With no candidate, the policy decides.
    """
    if not cc_version_text:
        # Trees older than Linux commit 8b59cd81dc5e record no compiler: build
        # with the one the kernel's Makefile picks, and say that nothing was checked.
        line = version_line("gcc")
        return Toolchain(None, None, "gcc" if line else None, line,
                         Match.SAME_VERSION if line else Match.MISSING)
    parsed = parse_cc_version_text(cc_version_text)
    if parsed is None:
        return _fallback(cc_version_text, None, policy)
    family, command, version = parsed
    wanted_tail = _after_command(cc_version_text, command)
    same_release: Toolchain | None = None
    for candidate in _candidates(family.name, command, version):
        line = version_line(candidate)
        if line is None:
            continue
        if _after_command(line, candidate) == wanted_tail:
            return Toolchain(cc_version_text, family.name, candidate, line, Match.EXACT,
                             family.make_vars)
        found = family.pattern.match(line)
        if same_release is None and found and found.group("version") == version:
            same_release = Toolchain(cc_version_text, family.name, candidate, line,
                                     Match.SAME_VERSION, family.make_vars)
    if same_release is not None:
        return same_release
    return _fallback(cc_version_text, family, policy)


def _candidates(family: str, command: str, version: str) -> list[str]:
    major = version.split(".")[0]
    unprefixed = re.sub(r"^[\w.+]+-(?=(?:gcc|clang))", "", command)
    out: list[str] = []
    for name in (command, unprefixed, f"{family}-{major}", family):
        if name not in out:
            out.append(name)
    return out


def _fallback(wanted: str, family: CompilerFamily | None, policy: ToolchainPolicy) -> Toolchain:
    name = family.name if family else None
    if policy.on_missing is OnMissing.SUBSTITUTE and policy.substitute:
        line = version_line(policy.substitute)
        if line is not None:
            sub = parse_cc_version_text(line)
            make_vars = sub[0].make_vars if sub else ()
            return Toolchain(wanted, sub[0].name if sub else name, policy.substitute, line,
                             Match.SUBSTITUTE, make_vars)
    return Toolchain(wanted, name, None, None, Match.MISSING)


def tool_versions() -> dict[str, str | None]:
    """Versions of the other programs a module build runs; part of every fingerprint."""
    return {
        "make": version_line("make"),
        # pahole generates BTF for modules of kernels with CONFIG_DEBUG_INFO_BTF_MODULES (6.12).
        "pahole": version_line("pahole"),
        "ld": version_line("ld"),
    }
