"""Kernel lines: a series and a flavour ("6.1/amd64", "6.12/cloud-amd64").

A line is the sequence of kernel builds one package name upgrades through;
regressions, churn and survival are all measured along a line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from debian.debian_support import Version

# 6.1.0-56-amd64, 6.12.57+deb12-amd64, 6.1.0-56-rt-amd64, 6.9.7+bpo-cloud-amd64
_DEBIAN_RE = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)*(?:-\d+)?(?:\+[\w.~]+)?-([a-z][\w-]*)$")
# 5.14.0-427.13.1.el9_4.x86_64, 6.8.9-300.fc40.x86_64, 6.8.0-1.x86_64+debug
_RPM_RE = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)*-[\w.]+?\.(x86_64|aarch64|ppc64le|s390x|i686)"
                     r"(?:\+(\w+))?$")
_SERIES_RE = re.compile(r"^(\d+)\.(\d+)")


def kernel_line(release: str) -> str:
    """The line a release belongs to: "6.1.0-56-amd64" -> "6.1/amd64"."""
    m = _DEBIAN_RE.match(release)
    if m:
        return f"{m.group(1)}.{m.group(2)}/{m.group(3)}"
    m = _RPM_RE.match(release)
    if m:
        flavour = m.group(3) + (f"+{m.group(4)}" if m.group(4) else "")
        return f"{m.group(1)}.{m.group(2)}/{flavour}"
    m = _SERIES_RE.match(release)
    # Unknown shapes (a locally built kernel): one line per series, flavour unknown.
    return f"{m.group(1)}.{m.group(2)}/unknown" if m else f"{release}/unknown"


def release_sort_key(release: str) -> tuple[Version, str]:
    """Order releases as their ABI versions order: 6.1.0-9 < 6.1.0-47 < 6.12.107+deb12."""
    m = re.match(r"^(\d+\.\d+\.\d+(?:-\d+)?(?:\+\w+)?)-?(.*)$", release)
    if m:
        return Version(m.group(1)), m.group(2)
    return Version("0"), release


def kernel_flavour(release: str) -> str:
    """"6.1.0-56-cloud-amd64" -> "cloud-amd64"."""
    return kernel_line(release).partition("/")[2]


def group_by_line(releases: Iterable[str]) -> dict[str, list[str]]:
    """Releases per line, each line oldest first."""
    lines: dict[str, list[str]] = {}
    for release in releases:
        lines.setdefault(kernel_line(release), []).append(release)
    return {line: sorted(rs, key=release_sort_key) for line, rs in sorted(lines.items())}
