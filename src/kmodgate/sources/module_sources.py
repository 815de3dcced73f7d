"""Module sources: the strings a person types to name a module's source code.

* ``debian:<name>-dkms``: a Debian DKMS package, fetched through the host's
  apt and unpacked (never installed); the tree is its ``/usr/src/<dir>``;
* a directory containing a ``dkms.conf``;
* ``git+<path-or-url>[@<ref>]``: a commit of a git repository, so a module's
  maintainer can check every commit against every tracked kernel;
* a source tarball (``.tar.gz``, ``.tgz``, ``.tar.xz``, ``.txz``, ``.tar.bz2``,
  ``.tar``), extracted safely.

Trees are treated as read-only: builds copy them.  Anything kmodgate
extracts lives in the cache under a content key (the commit, the tarball's
hash, the package's hash), so a source is fetched once.  Name and version are
read statically from literal ``PACKAGE_NAME=``/``PACKAGE_VERSION=`` lines;
the authoritative values come from evaluating dkms.conf per kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from kmodgate.cache import cache_subdir, staging_dir
from kmodgate.errors import InfraError, UserError
from kmodgate.sources import debian

DEBIAN_PREFIX = "debian:"
GIT_PREFIX = "git+"
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar")
# Debian Depends that are the DKMS framework itself, not something the build uses.
FRAMEWORK_DEPENDS = frozenset({"dkms"})
# How deep below an unpacked package, repository or tarball dkms.conf may sit.
DKMS_CONF_DEPTH = 3

_LITERAL_RE = r"^\s*{name}=([\"']?)([^\"'$`\s]+)\1\s*(?:#.*)?$"


@dataclass(frozen=True)
class ModuleSource:
    ref: str  # as the user wrote it
    name: str  # PACKAGE_NAME if known, else the directory/package name
    version: str  # PACKAGE_VERSION, git commit, or package version
    tree: Path  # directory containing dkms.conf (treat as read-only; builds copy it)
    tree_hash: str  # sha256 over the tree's files (paths + modes + contents), stable
    commit: str | None  # git commit for git sources
    build_depends: tuple[str, ...]  # a -dkms package's Debian Depends (minus dkms itself)


def is_source_ref(ref: str) -> bool:
    """Whether *ref*, in a module position, names a module *source* (built by the
    build check) rather than module binaries (read by the abi check)."""
    if ref.startswith((DEBIAN_PREFIX, GIT_PREFIX)) or ref.endswith(TARBALL_SUFFIXES):
        return True
    try:
        return Path(ref, "dkms.conf").is_file()
    except OSError:
        return False  # unreadable: the binary reader will say so in one line


def load_source(ref: str) -> ModuleSource:
    """The module source *ref* names; UserError with one clear line if it names none."""
    if ref.startswith(DEBIAN_PREFIX):
        return _debian_source(ref)
    if ref.startswith(GIT_PREFIX):
        return _git_source(ref)
    path = Path(ref)
    if path.is_dir():
        if not (path / "dkms.conf").is_file():
            raise UserError("directory has no dkms.conf (a module source needs one)", where=ref)
        tree = path.resolve()
        name, version = _static_name_version(tree, fallback_name=tree.name)
        digest = tree_sha256(tree)
        return ModuleSource(ref, name, version or digest[:12], tree, digest, None, ())
    if ref.endswith(TARBALL_SUFFIXES):
        if not path.is_file():
            raise UserError("no such tarball", where=ref)
        return _tarball_source(ref, path)
    raise UserError(
        "not a module source: expected debian:<name>-dkms, a directory with a dkms.conf, "
        "git+<path-or-url>@<ref>, or a .tar.gz/.tar.xz tarball", where=ref,
    )


def _debian_source(ref: str) -> ModuleSource:
    package = ref[len(DEBIAN_PREFIX):]
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", package):
        raise UserError("not a Debian package name", where=ref)
    info = debian.package_info(package)
    deb = debian.download(package)  # UserError if apt does not know it
    tree = _find_dkms_tree(debian.unpack(deb) / "usr" / "src", ref)
    name, _ = _static_name_version(tree, fallback_name=package.removesuffix("-dkms"))
    if info is not None:
        depends = tuple(d for d in info.depends if d not in FRAMEWORK_DEPENDS)
        version = info.version
    else:
        # Offline, from the cache: apt-get download names files
        # <name>_<version, epoch ':' as %3a>_<arch>.deb.
        depends = ()
        version = deb.name.split("_")[1].replace("%3a", ":")
    return ModuleSource(ref, name, version, tree, tree_sha256(tree), None, depends)


def _git_source(ref: str) -> ModuleSource:
    spec = ref[len(GIT_PREFIX):]
    location, sep, rev = spec.rpartition("@")
    # An "@" may belong to the URL ("git@host:repo", "https://user@host/repo"):
    # refs never contain ":", and a scheme's user part never contains "/".
    if not sep or not location or ":" in rev or re.fullmatch(r"[\w+.-]+://[^/]*", location):
        location, rev = spec, "HEAD"
    if not location:
        raise UserError("no repository given", where=ref)
    if "://" not in location and not re.match(r"^[\w.-]+@[\w.-]+:", location):
        path = Path(location)
        if not path.exists():
            raise UserError("no such git repository", where=ref)
        location = str(path.resolve())
    mirror = cache_subdir("git") / hashlib.sha256(location.encode()).hexdigest()[:24]
    if not mirror.exists():
        with staging_dir(mirror) as tmp:
            _git(["clone", "--mirror", "--quiet", location, str(tmp)], ref, what="clone")
    elif not re.fullmatch(r"[0-9a-f]{40}", rev) or _resolve(mirror, rev) is None:
        # Branches and tags move: refresh them, unless offline and already known.
        try:
            _git(["-C", str(mirror), "fetch", "--quiet", "--prune", "origin"], ref,
                 what="fetch")
        except UserError:
            if _resolve(mirror, rev) is None:
                raise
    commit = _resolve(mirror, rev)
    if commit is None:
        raise UserError(f"no commit, branch or tag {rev!r} in the repository", where=ref)
    root = cache_subdir("git-trees") / commit
    if not root.exists():
        with staging_dir(root) as tmp:
            archive = tmp / "archive.tar"
            _git(["-C", str(mirror), "archive", "--format=tar", "-o", str(archive), commit],
                 ref, what="archive")
            out = tmp / "tree"
            _safe_extract(archive, out, ref)
            archive.unlink()
    tree = _find_dkms_tree(root / "tree", ref)
    name, version = _static_name_version(tree, fallback_name=_repo_name(location))
    short = commit[:12]
    return ModuleSource(ref, name, f"{version}+g{short}" if version else short, tree,
                        tree_sha256(tree), commit, ())


def _repo_name(location: str) -> str:
    return re.sub(r"\.git$", "", re.split(r"[/:]", location.rstrip("/"))[-1]) or "module"


def _git(args: list[str], ref: str, *, what: str) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "GIT_TERMINAL_PROMPT": "0", "HOME": os.environ.get("HOME", "/nonexistent")}
    try:
        proc = subprocess.run(
            # The repository may belong to another user; it is only read.
            ["git", "-c", "safe.directory=*", *args],
            capture_output=True, text=True, check=False, env=env, stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise InfraError("git is not installed; it is needed for git module sources") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise UserError(f"git {what} failed: {lines[-1] if lines else 'no message'}", where=ref)
    return proc.stdout


def _resolve(mirror: Path, rev: str) -> str | None:
    proc = subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(mirror), "rev-parse", "--verify", "--quiet",
         f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def _tarball_source(ref: str, path: Path) -> ModuleSource:
    digest = debian.file_sha256(path)
    root = cache_subdir("tarballs") / digest[:24]
    if not root.exists():
        with staging_dir(root) as tmp:
            _safe_extract(path, tmp / "tree", ref)
    tree = _find_dkms_tree(root / "tree", ref)
    fallback = re.sub(r"(\.tar(\.\w+)?|\.tgz|\.txz|\.tbz2)$", "", path.name)
    name, version = _static_name_version(tree, fallback_name=fallback)
    tree_digest = tree_sha256(tree)
    return ModuleSource(ref, name, version or tree_digest[:12], tree, tree_digest, None, ())


def _safe_extract(archive: Path, dest: Path, ref: str) -> None:
    """Extract *archive* refusing absolute paths, "..", links leaving *dest* and
    device files (tarfile's "data" filter), then make the tree readable by the
    sandbox's unprivileged uid."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter would merely strip a leading "/"; a source
            # tarball naming absolute paths is refused outright.
            absolute = next((m.name for m in tar if m.name.startswith("/")), None)
            if absolute:
                raise tarfile.TarError(f"member {absolute[:80]!r} has an absolute path")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot extract the tarball safely: {e}", where=ref) from None
    _make_readable(dest)


def _make_readable(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, st.st_mode | 0o644)


def _find_dkms_tree(root: Path, ref: str) -> Path:
    """The one directory at most DKMS_CONF_DEPTH levels below *root* holding a dkms.conf."""
    if not root.is_dir():
        raise UserError("contains no dkms.conf (not a DKMS module source)", where=ref)
    found: list[Path] = []
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base
        if "dkms.conf" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # a dkms.conf owns its subtree
        elif depth >= DKMS_CONF_DEPTH:
            dirnames[:] = []
        dirnames.sort()
    if not found:
        raise UserError("contains no dkms.conf (not a DKMS module source)", where=ref)
    found.sort(key=lambda p: (len(p.parts), str(p)))
    if len(found) > 1 and len(found[0].parts) == len(found[1].parts):
        where = ", ".join(str(p.relative_to(root)) for p in found[:4])
        raise UserError(f"contains several dkms.conf ({where}); point at one directory",
                        where=ref)
    return found[0]


def _static_name_version(tree: Path, *, fallback_name: str) -> tuple[str, str]:
    """PACKAGE_NAME and PACKAGE_VERSION when dkms.conf assigns them literally
    (the last assignment wins, as in the shell); else the fallback and ""."""
    try:
        text = (tree / "dkms.conf").read_text(errors="replace")
    except OSError:
        return fallback_name, ""

    def literal(name: str) -> str:
        matches = re.findall(_LITERAL_RE.format(name=name), text, flags=re.MULTILINE)
        return matches[-1][1] if matches else ""

    return literal("PACKAGE_NAME") or fallback_name, literal("PACKAGE_VERSION")


def tree_sha256(tree: Path) -> str:
    """A digest of the tree's content, independent of where and when it was
    extracted: relative paths, a git-like mode (644, 755 or symlink) and
    contents (a symlink's target), in path order."""
    h = hashlib.sha256()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = Path(dirpath) / name
            entries.append((full.relative_to(tree).as_posix(), full))
    for rel, full in sorted(entries):
        st = full.lstat()
        if stat.S_ISLNK(st.st_mode):
            mode, body = "120000", os.readlink(full).encode()
            h.update(f"{mode} {rel}\0{len(body)}\0".encode() + body)
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # fifos and the like carry no source
        mode = "100755" if st.st_mode & 0o111 else "100644"
        h.update(f"{mode} {rel}\0{st.st_size}\0".encode())
        with open(full, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
