"""The Debian archive, through the host's own apt: discover, download, unpack.

Nothing here names a mirror: ``apt-get download`` fetches from whatever the
host's sources list says, as the user it runs as (no root needed).  Packages
are unpacked with ``dpkg-deb -x`` into the cache, never installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from debian.deb822 import Deb822, PkgRelation

from kmodgate.cache import atomic_write_bytes, cache_subdir, staging_dir
from kmodgate.errors import InfraError, UserError
from kmodgate.lines import kernel_flavour, release_sort_key

# A kernel release as Debian names its packages: "6.1.0-56-amd64",
# "6.12.117+deb12-cloud-amd64".  Meta-packages ("6.12-amd64", "amd64") have
# no three-part version and are not kernel builds.
RELEASE_RE = re.compile(r"^\d+\.\d+\.\d+[^\s/]*$")
COMMON_SUFFIXES = ("-common", "-common-rt")

HEADERS_PREFIX = "linux-headers-"
IMAGE_PREFIXES = ("linux-image-{release}", "linux-image-{release}-unsigned")


@dataclass(frozen=True, slots=True)
class AptPackage:
    name: str
    version: str
    depends: list[str]
    filename: str


def _run(cmd: list[str], what: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, check=False,
            env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    except FileNotFoundError:
        raise InfraError(f"{cmd[0]} is not installed; it is needed to {what}") from None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def apt_lists_state() -> str:
    """A digest of apt's package lists: names, sizes and times of every index file.

    What apt answers changes only when these do, so answers are cached under it.
    """
    lists = Path("/var/lib/apt/lists")
    h = hashlib.sha256()
    try:
        for entry in sorted(os.scandir(lists), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return "no-apt-lists"
    return h.hexdigest()[:16]


class _AptAnswers:
    """apt-cache's answers, remembered on disk per state of apt's lists.

    apt-cache takes 0.3-2 s a call (it maps the whole package cache), and every
    kmodgate command asks it several questions; the answers are the same until
    `apt-get update` changes the lists.  Concurrent writers may drop each
    other's entries, which only costs a recomputation.
    """

    def __init__(self) -> None:
        self.state: str | None = None
        self.answers: dict[str, Any] = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        state = apt_lists_state()
        path = cache_subdir("apt") / f"{state}.json"
        if state != self.state:
            self.state, self.answers = state, self._read(path)
        if key not in self.answers:
            value = compute()
            on_disk = self._read(path)
            on_disk.update(self.answers)
            on_disk[key] = value
            self.answers = on_disk
            atomic_write_bytes(path, json.dumps(on_disk).encode())
        return self.answers[key]

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


_apt = _AptAnswers()


def available_kernel_releases(flavour: str | None = None) -> list[str]:
    """Kernel releases the host's apt sources offer headers for, oldest first;
    with *flavour*, only that flavour ("amd64" is not "cloud-amd64")."""
    releases: list[str] = _apt.get(f"releases:{flavour or ''}",
                                   lambda: _search_kernel_releases(flavour))
    return releases


def _search_kernel_releases(flavour: str | None) -> list[str]:
    proc = _run(["apt-cache", "search", "--names-only", f"^{HEADERS_PREFIX}"],
                "list the kernels the archive offers")
    if proc.returncode != 0:
        raise InfraError(f"apt-cache search failed: {_last_line(proc.stderr)}")
    releases = []
    for line in proc.stdout.splitlines():
        name = line.split(" ", 1)[0]
        release = name[len(HEADERS_PREFIX):]
        if not RELEASE_RE.match(release) or release.endswith(COMMON_SUFFIXES):
            continue
        if flavour and kernel_flavour(release) != flavour:
            continue
        releases.append(release)
    return sorted(set(releases), key=release_sort_key)


def package_info(name: str) -> AptPackage | None:
    """The candidate version of *name* in the host's apt sources, or None if unknown."""
    fields = _apt.get(f"package:{name}", lambda: _show_package(name))
    return None if fields is None else AptPackage(**fields)


def _show_package(name: str) -> dict[str, Any] | None:
    proc = _run(["apt-cache", "show", "--no-all-versions", name], f"look up {name}")
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    fields = Deb822(proc.stdout)
    # parse_relations() logs a warning for an empty field; a package may have none.
    relations = fields.get("Depends", "").strip()
    parsed = PkgRelation.parse_relations(relations) if relations else []
    depends = [alt[0]["name"] for alt in parsed]
    return {"name": fields["Package"], "version": fields["Version"], "depends": depends,
            "filename": fields.get("Filename", "")}


def package_versions(names: list[str]) -> dict[str, str]:
    """Candidate versions of many packages in one apt-cache call (unknown ones absent)."""
    if not names:
        return {}
    key = "versions:" + hashlib.sha256("\0".join(sorted(names)).encode()).hexdigest()[:16]
    versions: dict[str, str] = _apt.get(key, lambda: _show_versions(names))
    return versions


def _show_versions(names: list[str]) -> dict[str, str]:
    proc = _run(["apt-cache", "show", "--no-all-versions", *names], "look up package versions")
    versions: dict[str, str] = {}
    for stanza in Deb822.iter_paragraphs(proc.stdout):
        if "Package" in stanza and "Version" in stanza:
            versions.setdefault(stanza["Package"], stanza["Version"])
    return versions


def download(name: str) -> Path:
    """The .deb of *name*'s candidate version, from the cache or through apt-get download."""
    debs = cache_subdir("debs")
    info = package_info(name)
    if info is None:
        cached = sorted(debs.glob(f"{name}_*.deb"))
        if cached:
            return cached[-1]  # offline, or the archive dropped it: use what we have
        raise UserError(f"no package {name} in the host's apt sources")
    # apt-get download names files <name>_<version without epoch>_<arch>.deb
    # and escapes ':' as %3a.
    version = info.version.split(":", 1)[-1]
    existing = [p for p in debs.glob(f"{name}_*.deb") if p.name.split("_")[1] == version]
    if existing:
        return existing[0]
    with staging_dir(debs / f".dl-{name}") as tmp:
        proc = _run(["apt-get", "download", f"{name}={info.version}"],
                    f"download {name}", cwd=tmp)
        if proc.returncode != 0:
            raise InfraError(f"apt-get download {name} failed: {_last_line(proc.stderr)}")
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise InfraError(f"apt-get download {name} produced {len(got)} files")
        target = debs / got[0].name
        got[0].replace(target)
    return target


def unpack(deb: Path) -> Path:
    """*deb*'s files under a cache directory keyed by the package's content."""
    digest = _known_digest(deb)
    final = cache_subdir("unpacked") / digest[:24]
    if final.exists():
        return final
    with staging_dir(final) as tmp:
        proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpack {deb.name}")
        if proc.returncode != 0:
            raise UserError(
                f"not a valid Debian package: {_last_line(proc.stderr)}", where=deb
            )
    return final


def _known_digest(path: Path) -> str:
    """file_sha256(path), remembered while the file's (size, mtime, inode) stay the
    same: a linux-image .deb is 70-107 MB, and every reference to it would
    otherwise hash it again only to find the unpacked tree it already has."""
    st = path.stat()
    key = str(path.resolve())
    identity = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo = cache_subdir("unpacked") / "digests.json"
    try:
        known = json.loads(memo.read_bytes())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if isinstance(entry, list) and entry[:3] == identity and len(entry) == 4:
        return str(entry[3])
    digest = file_sha256(path)
    known[key] = [*identity, digest]
    atomic_write_bytes(memo, json.dumps(known).encode())
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def headers_package(release: str) -> str:
    if not RELEASE_RE.match(release):
        raise UserError(
            f"unknown kernel release {release!r}: expected a Debian kernel release such as "
            "6.1.0-56-amd64 (see `kmodgate kernels --available`)"
        )
    name = HEADERS_PREFIX + release
    return name


def fetch_headers(release: str) -> Path:
    """The unpacked flavour headers package of *release* (Module.symvers, .config)."""
    name = headers_package(release)
    if package_info(name) is None and not list(cache_subdir("debs").glob(f"{name}_*.deb")):
        raise UserError(
            f"unknown Debian kernel release {release!r}: no package {name} in the host's "
            "apt sources (see `kmodgate kernels --available`)"
        )
    return unpack(download(name))


def fetch_build_tree(release: str) -> list[Path]:
    """Unpacked roots of everything an out-of-tree build needs for *release*:
    the flavour headers and the packages they depend on from the same source
    (the -common headers and linux-kbuild), found through the package's own
    Depends rather than by guessing names."""
    name = headers_package(release)
    info = package_info(name)
    if info is None:
        raise UserError(f"unknown Debian kernel release {release!r}: no package {name}")
    roots = [unpack(download(name))]
    for dep in info.depends:
        if dep.startswith(("linux-headers-", "linux-kbuild-")):
            roots.append(unpack(download(dep)))
    return roots


def fetch_image(release: str) -> Path:
    """The unpacked linux-image package of *release* (the kernel and its modules)."""
    headers_package(release)  # validates the release's shape
    for pattern in IMAGE_PREFIXES:
        name = pattern.format(release=release)
        if package_info(name) is not None or list(cache_subdir("debs").glob(f"{name}_*.deb")):
            return unpack(download(name))
    raise UserError(
        f"unknown Debian kernel release {release!r}: no linux-image package for it in the "
        "host's apt sources (see `kmodgate kernels --available`)"
    )
