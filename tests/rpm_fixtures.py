"""Small RPMs built by the real rpmbuild, for the RPM reader's tests.

Each package is built from a generated spec in its own directory under the
test's tmp dir: files are copied into the buildroot, and nothing rpmbuild
would normally do to them (stripping, debuginfo, automatic dependencies) is
done, so the payload holds exactly the bytes the test put in.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import rpmfile

# rpmbuild's payload writers by compressor (rpmio's "w<level>.<io>" notation).
PAYLOADS = {"gzip": "w9.gzdio", "xz": "w6.xzdio", "zstd": "w19.zstdio"}


@dataclass
class RpmRecipe:
    name: str
    version: str = "1.0"
    release: str = "1"
    arch: str = "x86_64"
    files: dict[str, bytes] = field(default_factory=dict)  # install path -> content
    trees: dict[str, Path] = field(default_factory=dict)  # install path -> directory to copy
    symlinks: dict[str, str] = field(default_factory=dict)  # install path -> link target
    provides: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)
    payload: str = "gzip"


def build_rpm(recipe: RpmRecipe, workdir: Path) -> Path:
    """Build *recipe* with rpmbuild under *workdir*; the path of the binary RPM."""
    top = workdir / f"{recipe.name}-build"
    stage = top / "stage"
    stage.mkdir(parents=True)
    owned: list[str] = []
    for dest, content in recipe.files.items():
        target = stage / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        owned.append(dest)
    for dest, source in recipe.trees.items():
        target = stage / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, symlinks=True)
        owned.append(dest)
    for dest, link in recipe.symlinks.items():
        target = stage / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.symlink_to(link)
        if not any(dest.startswith(tree + "/") for tree in recipe.trees):
            owned.append(dest)
    spec_lines = [
        f"Name: {recipe.name}",
        f"Version: {recipe.version}",
        f"Release: {recipe.release}",
        "Summary: kmodgate test package",
        "License: GPL-2.0-only",
        "AutoReqProv: no",
        *(f"Provides: {p}" for p in recipe.provides),
        *(f"Requires: {r}" for r in recipe.requires),
        "",
        "%description",
        "Built by kmodgate's tests.",
        "",
        "%install",
        f"cp -a {stage}/. %{{buildroot}}/",
        "",
        "%files",
        *(f'"{path}"' for path in sorted(set(owned))),
        "",
    ]
    spec = top / f"{recipe.name}.spec"
    spec.write_text("\n".join(spec_lines))
    cmd = [
        "rpmbuild", "-bb", "--target", recipe.arch,
        "--define", f"_topdir {top}",
        "--define", f"_binary_payload {PAYLOADS[recipe.payload]}",
        "--define", "debug_package %{nil}",
        "--define", "__os_install_post %{nil}",
        "--define", "_build_id_links none",
        str(spec),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rpmbuild failed for {recipe.name}:\n{proc.stderr[-3000:]}")
    built = list((top / "RPMS").rglob("*.rpm"))
    assert len(built) == 1, built
    return built[0]


def rpm_query(path: Path, what: str) -> list[str]:
    """``rpm -qp --<what>`` lines: the reference the reader is held to."""
    proc = subprocess.run(
        ["rpm", "-qp", f"--{what}", str(path)], capture_output=True, text=True, check=True
    )
    return proc.stdout.splitlines()


def newc_archive(members: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the newc format rpm's payloads use: (name, mode, data)."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * ((4 - len(out) % 4) % 4))

    for ino, (name, mode, data) in enumerate([*members, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(encoded)
        pad()
        out.extend(data)
        pad()
    return bytes(out)


def with_payload(rpm_path: Path, members: list[tuple[str, int, bytes]], out: Path) -> Path:
    """A copy of a gzip-payload RPM whose payload is replaced by *members*.

    The header's payload digest is rewritten to match, so the package is
    internally consistent as far as the payload goes: this is what a hostile
    builder can hand out, not a corrupted download.
    """
    raw = rpm_path.read_bytes()
    with rpmfile.open(str(rpm_path)) as rpm:
        offset = rpm.data_offset
        old_digest = rpm.headers["payloaddigest"][0]
        assert rpm.headers.get("archive_compression", b"gzip") == b"gzip"
    payload = gzip.compress(newc_archive(members))
    new_digest = hashlib.sha256(payload).hexdigest().encode()
    header = raw[:offset]
    assert header.count(old_digest) == 1 and len(new_digest) == len(old_digest)
    out.write_bytes(header.replace(old_digest, new_digest) + payload)
    return out
