"""A kernel build tree, staged for a module build at its canonical paths.

Module Makefiles and dkms.conf files hard-code where kernel trees live:
``/lib/modules/<release>/build``, ``/usr/src/linux-headers-<release>``, and
Debian's flavour tree is a one-line Makefile that includes
``/usr/src/linux-headers-<abi>-common/Makefile`` by absolute path, with
``scripts`` and ``tools`` links pointing at ``../../lib/linux-kbuild-<v>``.
Rather than rewrite any of that, kmodgate presents the unpacked packages to
the build sandbox exactly where the packages would have installed them: each
``usr/src/*`` entry at ``/usr/src/*``, each ``usr/lib/linux-kbuild-*`` at
``/usr/lib/``, ``lib/modules/<release>`` at ``/lib/modules/<release>``.
Everything unchanged builds as it would on a machine with the headers installed.

Kernel references accepted here: ``debian:<release>`` (headers, -common and
kbuild through the package's Depends), a directory (an unpacked package
root, an RPM ``kernel-devel`` tree, ``/lib/modules/<release>/build`` or any
headers tree), a ``linux-headers-*.deb`` whose companions apt can fetch, and
an RPM ``kernel-devel`` package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodgate.abi.kconfig import MACHINE_OF_ARCH, parse_config
from kmodgate.build.sandbox import HIDDEN_DIRS, SCRATCH_DIRS, Mount
from kmodgate.cache import atomic_write_bytes, cache_subdir, staging_dir
from kmodgate.errors import InfraError, UserError
from kmodgate.sources import debian
from kmodgate.sources.debian import apt_lists_state
from kmodgate.sources.kernels import DEBIAN_PREFIX, find_build_tree, tree_arch, tree_release

# Where a package root's parts go inside the sandbox: (glob under the root,
# target directory).  Kernel packaging knowledge as data: Debian puts trees in
# usr/src and kbuild in usr/lib/linux-kbuild-*; RPM kernel-devel in
# usr/src/kernels; both point lib/modules/<release>/build at their tree.
ROOT_LAYOUT: tuple[tuple[str, str], ...] = (
    ("usr/src/*", "/usr/src"),
    ("usr/lib/linux-kbuild-*", "/usr/lib"),
    ("lib/modules/{release}", "/lib/modules"),
)

# Where a bare tree (not inside a package root) is placed.
BARE_TREE_TARGET = "/usr/src/linux-headers-{release}"

# Bump when staging changes what the build sees, so cached results are redone.
STAGING_VERSION = 1


@dataclass(frozen=True)
class KernelTree:
    """A kernel build tree and how the build sandbox sees it."""

    ref: str  # as the person named it
    release: str  # uname -r of the kernel: "6.1.0-56-amd64"
    arch: str  # dkms's $arch (uname -m): "x86_64"
    host_tree: Path  # the flavour tree on the host (.config, Module.symvers)
    source_dir: str  # the tree's canonical path inside the sandbox
    mounts: tuple[Mount, ...]
    config: Mapping[str, str] = field(repr=False)
    identity: str  # hash of the tree's content: equal trees build equal modules

    @property
    def build_dir(self) -> str:
        """dkms's $kernel_source_dir: the path module Makefiles are told to use."""
        return f"/lib/modules/{self.release}/build"

    @property
    def cc_version_text(self) -> str | None:
        return self.config.get("CONFIG_CC_VERSION_TEXT")

    @property
    def symvers(self) -> Path:
        return self.host_tree / "Module.symvers"


def stage_kernel_tree(ref: str) -> KernelTree:
    """The build tree *ref* names, ready to mount; UserError if it names none."""
    if ref.startswith(DEBIAN_PREFIX):
        release = ref[len(DEBIAN_PREFIX):]
        roots = _debian_roots(release)
        return _from_roots(ref, roots, identity_seed="debian:" + ",".join(r.name for r in roots))
    path = Path(ref)
    if path.suffix == ".deb" and path.is_file():
        return _from_deb(ref, path)
    if path.suffix == ".rpm" and path.is_file():
        root = _unpack_rpm(path)
        return _from_roots(ref, [root], identity_seed="rpm:" + root.name)
    if not path.is_dir():
        raise UserError(
            "not a kernel build tree: expected debian:<release>, a headers directory "
            "(such as /lib/modules/<release>/build), a linux-headers .deb or a "
            "kernel-devel .rpm",
            where=ref,
        )
    return _from_directory(ref, path)


def _from_directory(ref: str, path: Path) -> KernelTree:
    tree = find_build_tree(path.resolve())
    root = _package_root(tree)
    if root is None:
        return _bare_tree(ref, tree)
    if root == Path("/"):
        return _host_tree(ref, tree)
    return _from_roots(ref, [root], identity_seed=None)


def _from_deb(ref: str, deb: Path) -> KernelTree:
    """A linux-headers .deb; its -common and kbuild companions come through apt."""
    root = debian.unpack(deb)
    roots = [root]
    fields = _deb_fields(deb)
    for dep in fields.get("Depends", "").split(","):
        name = dep.strip().split(" ", 1)[0]
        if name.startswith(("linux-headers-", "linux-kbuild-")):
            roots.append(debian.unpack(debian.download(name)))
    return _from_roots(ref, roots, identity_seed="deb:" + ",".join(r.name for r in roots))


def _deb_fields(deb: Path) -> dict[str, str]:
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise UserError("not a valid Debian package", where=deb)
    return {"Depends": proc.stdout.strip()}


def _unpack_rpm(rpm_path: Path) -> Path:
    """An RPM's files under a cache directory keyed by its content (rpm2cpio | cpio)."""
    final = cache_subdir("unpacked") / ("rpm-" + debian.file_sha256(rpm_path)[:24])
    if final.exists():
        return final
    with staging_dir(final) as tmp:
        try:
            rpm2cpio = subprocess.Popen(["rpm2cpio", str(rpm_path)], stdout=subprocess.PIPE)
            cpio = subprocess.run(
                ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                stdin=rpm2cpio.stdout, cwd=tmp, capture_output=True, check=False,
            )
            rpm2cpio.wait()
        except FileNotFoundError as exc:
            raise InfraError(f"{exc.filename} is not installed; it is needed to unpack RPMs") \
                from None
        if rpm2cpio.returncode != 0 or cpio.returncode != 0:
            raise UserError("not a valid RPM package", where=rpm_path)
    return final


def _package_root(tree: Path) -> Path | None:
    """The directory a package was unpacked into, if *tree* sits at .../usr/src/..."""
    for parent in tree.parents:
        if parent.name == "src" and parent.parent.name == "usr":
            return parent.parent.parent
    return None


# ---------------------------------------------------------------- Debian


def _debian_roots(release: str) -> list[Path]:
    """The unpacked packages of *release*, memoised against the state of apt's lists.

    Resolving which package versions are current costs several apt-cache calls;
    while apt's package lists are unchanged the answer cannot change, so an
    unchanged second run skips them.
    """
    memo = cache_subdir("build-trees") / "debian-roots.json"
    key = f"{release}\0{apt_lists_state()}"
    try:
        known: dict[str, list[str]] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    cached = known.get(key)
    if cached and all(Path(p).is_dir() for p in cached):
        return [Path(p) for p in cached]
    roots = debian.fetch_build_tree(release)
    # Re-read before writing: another run may have added its own releases.
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    known = {k: v for k, v in known.items() if k.endswith(apt_lists_state())}
    known[key] = [str(r) for r in roots]
    atomic_write_bytes(memo, json.dumps(known, sort_keys=True).encode())
    return roots


# ---------------------------------------------------------------- staging


def _from_roots(ref: str, roots: Sequence[Path], identity_seed: str | None) -> KernelTree:
    """A tree whose packages were unpacked into *roots* (one or several)."""
    trees = []
    for root in roots:
        try:
            trees.append(find_build_tree(root))
        except UserError:
            continue  # -common and kbuild packages hold no Module.symvers
    if len(trees) != 1:
        names = ", ".join(str(r) for r in roots)
        raise UserError(f"expected exactly one kernel build tree in {names}, found {len(trees)}",
                        where=ref)
    tree = trees[0]
    release = tree_release(tree)
    owner = next(r for r in roots if tree.is_relative_to(r))
    source_dir = "/" + str(tree.relative_to(owner))
    mounts: list[Mount] = []
    for root in roots:
        for pattern, target_dir in ROOT_LAYOUT:
            for entry in sorted(root.glob(pattern.format(release=release))):
                mounts.append(Mount(entry, f"{target_dir}/{entry.name}"))
    targets = {m.target for m in mounts}
    build_ok = any((r / "lib/modules" / release / "build").is_symlink()
                   or (r / "lib/modules" / release / "build").is_dir() for r in roots)
    if f"/lib/modules/{release}" not in targets or not build_ok:
        mounts = [m for m in mounts if m.target != f"/lib/modules/{release}"]
        mounts.append(Mount(_build_link_dir(release, source_dir), f"/lib/modules/{release}"))
    if identity_seed is None:
        identity = _content_identity([m.source for m in mounts if m.source.is_dir()], tree)
    else:
        identity = _digest(identity_seed)
    return _kernel_tree(ref, tree, release, source_dir, mounts, identity)


def _host_tree(ref: str, tree: Path) -> KernelTree:
    """A tree installed on the host.  The sandbox hides the host's /usr/src and
    /lib/modules (a build sees only the kernel it is checked against), so the
    tree and what it reaches are mounted back at their own paths."""
    release = tree_release(tree)
    dirs = _host_tree_dirs(tree)
    mounts = [Mount(d, str(d)) for d in dirs]
    mounts.append(Mount(_build_link_dir(release, str(tree)), f"/lib/modules/{release}"))
    return _kernel_tree(ref, tree, release, str(tree), mounts, _content_identity(dirs, tree))


def _host_tree_dirs(tree: Path) -> list[Path]:
    """The tree and what its symlinks and one-line Makefile reach (Debian's -common, kbuild)."""
    dirs = {tree}
    for name in ("scripts", "tools"):
        link = tree / name
        if link.is_symlink():
            dirs.add(link.resolve().parent)
    makefile = tree / "Makefile"
    if makefile.is_file() and makefile.stat().st_size < 512:
        for line in makefile.read_text(errors="replace").splitlines():
            if line.startswith("include /"):
                dirs.add(Path(line.split(None, 1)[1]).parent)
    return sorted(d for d in dirs if d.is_dir())


def _bare_tree(ref: str, tree: Path) -> KernelTree:
    """A tree outside any package layout (a kernel built in place): mounted at the
    canonical headers path, with a build link beside it."""
    release = tree_release(tree)
    source_dir = BARE_TREE_TARGET.format(release=release)
    mounts = [
        Mount(tree, source_dir),
        Mount(_build_link_dir(release, source_dir), f"/lib/modules/{release}"),
    ]
    return _kernel_tree(ref, tree, release, source_dir, mounts, _content_identity([tree], tree))


def _kernel_tree(ref: str, tree: Path, release: str, source_dir: str,
                 mounts: Sequence[Mount], identity: str) -> KernelTree:
    config_path = tree / ".config"
    if not config_path.is_file():
        raise UserError("kernel build tree has no .config: modules cannot be built against it",
                        where=tree)
    config = parse_config(config_path.read_text(errors="replace"))
    return KernelTree(
        ref=ref,
        release=release,
        arch=_machine(tree, config),
        host_tree=tree,
        source_dir=source_dir,
        mounts=tuple(placeable_mounts(mounts)),
        config=config,
        identity=identity,
    )


def placeable_mounts(desired: Sequence[Mount]) -> list[Mount]:
    """*desired*, plus what makes their targets exist inside the sandbox.

    The sandbox shows the host's root read-only, and bubblewrap (0.8, no
    overlay support) cannot create a mount point on it: a tree meant for
    /usr/src/linux-headers-6.1.0-47-amd64 on a host without that directory
    cannot be bound there directly.  So the nearest existing ancestor (say
    /usr/src) is replaced by a "view": a directory holding a placeholder for
    each of the host's entries plus the new mount points, with every host
    entry bound back over its placeholder.  Inside, the ancestor looks as on
    the host, with the kernel's trees added -- except where the sandbox hides
    the host's directory (its own /usr/src and /lib/modules: a build sees only
    the kernel it is checked against), whose view holds the new mount points
    alone.  Targets are canonicalised
    first (/lib is a symlink to /usr/lib on merged-/usr systems), so nested
    anchors (/usr/lib for kbuild, /usr/lib/modules for the release) are seen
    as nested and applied parents first; every target then exists, and the
    sandbox never needs to invent a mount point.
    """
    out: list[Mount] = []
    # anchor -> {path below it: symlink target, or None for a mount point}
    views: dict[str, dict[str, str | None]] = {}
    hidden = [os.path.realpath(d) for d in (*HIDDEN_DIRS, *SCRATCH_DIRS)]

    def exists_inside(path: str) -> bool:
        # The sandbox empties its hidden directories: what the host keeps below
        # them (headers installed in the host's /usr/src) is not there inside.
        return os.path.isdir(path) and (path in hidden or not _under_any(path, hidden))

    for m in desired:
        target = _canonical(m.target)
        link = os.readlink(m.source) if m.source.is_symlink() else None
        if link is not None and os.path.lexists(target) and exists_inside(
                os.path.dirname(target)):
            continue  # the host has that link already (e.g. /usr/src/linux-kbuild-6.1)
        anchor = target
        while not exists_inside(anchor) and anchor != "/":
            anchor = os.path.dirname(anchor)
        if anchor != target:
            views.setdefault(anchor, {})[os.path.relpath(target, anchor)] = link
        if link is None:
            out.append(Mount(m.source, target, m.writable))
    for anchor, needed in sorted(views.items()):
        show_host = not _under_any(anchor, hidden)
        view, entries = _view_dir(anchor, needed, show_host=show_host)
        out.append(Mount(view, anchor))
        for name, kind in entries:
            host = os.path.join(anchor, name)
            if kind != "l" and host not in views and not _under_any(host, hidden):
                out.append(Mount(Path(host), host))
    return out


def _under_any(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _canonical(target: str) -> str:
    """*target* with symlinks in its existing leading part resolved as on the host."""
    head, tail = target, ""
    while not os.path.lexists(head) and head != "/":
        head, name = os.path.split(head)
        tail = os.path.join(name, tail) if tail else name
    real = os.path.realpath(head)
    return os.path.join(real, tail) if tail else real


def _view_dir(anchor: str, needed: Mapping[str, str | None], *, show_host: bool) -> tuple[
        Path, list[tuple[str, str]]]:
    """A directory mirroring *anchor*'s entries as placeholders (if *show_host*),
    plus the *needed* mount points and symlinks."""
    entries: list[tuple[str, str]] = []
    links: dict[str, str] = {}
    for entry in sorted(os.scandir(anchor) if show_host else [], key=lambda e: e.name):
        if entry.is_symlink():
            entries.append((entry.name, "l"))
            links[entry.name] = os.readlink(entry.path)
        elif entry.is_dir():
            entries.append((entry.name, "d"))
        else:
            entries.append((entry.name, "f"))
    key = _digest(json.dumps([anchor, entries, links, sorted(needed.items())]))
    final = cache_subdir("build-trees") / "views" / key[:24]
    if not final.exists():
        with staging_dir(final) as tmp:
            for name, kind in entries:
                if kind == "l":
                    (tmp / name).symlink_to(links[name])
                elif kind == "d":
                    (tmp / name).mkdir()
                else:
                    (tmp / name).touch()
            for rel, link in sorted(needed.items()):
                if link is None:
                    (tmp / rel).mkdir(parents=True, exist_ok=True)
                else:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).symlink_to(link)
            os.chmod(tmp, 0o755)
    return final, entries


def _machine(tree: Path, config: Mapping[str, str]) -> str:
    """dkms's $arch, which is ``uname -m``, from the tree's ARCH and .config."""
    if config.get("CONFIG_X86_64") == "y":
        return "x86_64"
    if config.get("CONFIG_X86_32") == "y":
        return "i386"
    arch = tree_arch(tree) or "unknown"
    return MACHINE_OF_ARCH.get(arch, arch)


def _build_link_dir(release: str, source_dir: str) -> Path:
    """A directory holding ``build -> source_dir``, to be mounted at /lib/modules/<release>."""
    final = cache_subdir("build-trees") / "links" / _digest(f"{release}\0{source_dir}")[:24]
    if not final.exists():
        with staging_dir(final) as tmp:
            (tmp / "build").symlink_to(source_dir)
            (tmp / "source").symlink_to(source_dir)
            os.chmod(tmp, 0o755)  # the sandbox's unprivileged uid must read it
    return final


def _digest(text: str) -> str:
    return hashlib.sha256(f"staging {STAGING_VERSION}\0{text}".encode()).hexdigest()


@functools.lru_cache(maxsize=32)
def _content_identity_cached(dirs: tuple[Path, ...], key_files: tuple[Path, ...],
                             stamp: tuple[int, ...]) -> str:
    h = hashlib.sha256(f"staging {STAGING_VERSION}\0".encode())
    for f in key_files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for name in sorted(filenames) + [n for n in dirnames if os.path.islink(
                    os.path.join(dirpath, n))]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                rel = os.path.relpath(p, d)
                target = os.readlink(p) if os.path.islink(p) else ""
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
    return h.hexdigest()


def _content_identity(dirs: Sequence[Path], tree: Path) -> str:
    """A hash of a local tree: Module.symvers and .config by content, everything
    else by name, size and modification time (hashing every header would cost
    more than the build)."""
    key_files = (tree / "Module.symvers", tree / ".config")
    stamp = tuple(f.stat().st_mtime_ns for f in key_files if f.is_file())
    return _content_identity_cached(tuple(dirs), key_files, stamp)
