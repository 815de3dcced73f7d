"""Module references: the strings a person types to name module binaries.

* a ``.ko`` / ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz`` file;
* a directory, searched recursively;
* a ``.deb`` or ``.rpm`` holding modules (for a kmod RPM without .ko files,
  its ``Requires: kernel(sym) = 0xCRC`` stand in for the binary's __versions);
* ``debian-image:<release>``: every module of the release's linux-image package.

Reading thousands of modules is the hot path, so files are read by a process
pool and parsed results are cached by content (see ModuleIndex).
"""

from __future__ import annotations

import gc
import hashlib
import marshal
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from kmodgate.abi.compression import decompress
from kmodgate.abi.elf import read_module
from kmodgate.abi.model import ExportType, ModuleExport, ModuleInfo
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import UserError
from kmodgate.sources import debian, rpm
from kmodgate.sources.files import path_kind, read_file

DEBIAN_IMAGE_PREFIX = "debian-image:"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

# Bump when the reader's output changes, so cached parses are not reused.
READER_VERSION = 4

# Below this many files a process pool costs more than it saves.
PARALLEL_THRESHOLD = 64


def is_module_file(name: str) -> bool:
    return name.endswith(MODULE_SUFFIXES)


def load_modules(refs: Iterable[str], *, jobs: int | None = None) -> list[ModuleInfo]:
    """Every module the references name, in reference order; UserError on bad input."""
    out: list[ModuleInfo] = []
    for ref in refs:
        out.extend(load_module_ref(ref, jobs=jobs))
    return out


def load_module_ref(ref: str, *, jobs: int | None = None) -> list[ModuleInfo]:
    if ref.startswith(DEBIAN_IMAGE_PREFIX):
        root = debian.fetch_image(ref[len(DEBIAN_IMAGE_PREFIX):])
        return read_module_tree(root / "lib/modules", jobs=jobs)
    path = Path(ref)
    kind = path_kind(ref, "a module reference")
    if kind == "dir":
        modules = read_module_tree(path, jobs=jobs)
        if not modules:
            raise UserError("no kernel modules (.ko, .ko.xz, .ko.zst, .ko.gz) here", where=ref)
        return modules
    if kind is None:
        raise UserError(
            "no such file or directory, and not a known reference "
            "(a .ko file, a directory, a .deb/.rpm, debian-image:<release>)",
            where=ref,
        )
    if path.suffix == ".deb":
        modules = read_module_tree(debian.unpack(path), jobs=jobs)
        if not modules:
            raise UserError("the package contains no kernel modules", where=ref)
        return modules
    if path.suffix == ".rpm":
        return rpm.modules_from_rpm(path)
    return [read_module_file(path)]


def read_module_file(path: Path) -> ModuleInfo:
    return _parse(str(path), read_file(path))


def _parse(path: str, raw: bytes) -> ModuleInfo:
    digest = hashlib.sha256(raw).hexdigest()
    return read_module(decompress(raw, path), path, sha256=digest)


def _parse_file(path: str) -> ModuleInfo:
    return _parse(path, read_file(Path(path)))


def _parse_many(paths: list[str]) -> list[ModuleInfo | UserError]:
    """Worker body: errors travel back as values so one bad file names itself."""
    out: list[ModuleInfo | UserError] = []
    for p in paths:
        try:
            out.append(_parse_file(p))
        except UserError as exc:
            out.append(exc)
    return out


def find_module_files(root: Path) -> list[str]:
    """Module files under *root*, sorted; plain strings because this runs per file."""
    found: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        found.extend(os.path.join(dirpath, f) for f in files if is_module_file(f))
    found.sort()
    return found


def _stat_key(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


# A module as builtin types only, so the index can use marshal: reloading
# ~4,000 modules is twice as fast as with pickle (benchmarks/read_modules.py).
_Record = tuple[Any, ...]


def _to_record(m: ModuleInfo) -> _Record:
    exports = [(e.symbol, e.export_type.value, e.namespace, e.crc) for e in m.exports]
    return (m.name, m.path, m.machine, m.modinfo, m.versions, exports, m.undefined,
            m.weak_undefined, m.sha256, m.origin_kind)


def _from_record(r: _Record) -> ModuleInfo:
    name, path, machine, modinfo, versions, exports, undefined, weak, sha, origin_kind = r
    return ModuleInfo(
        name=name, path=path, machine=machine, modinfo=modinfo,
        versions=versions,
        exports=[ModuleExport(s, ExportType(t), ns, crc) for s, t, ns, crc in exports],
        undefined=undefined, weak_undefined=weak, sha256=sha, origin_kind=origin_kind,
    )


class ModuleIndex:
    """Parsed modules of one directory tree, keyed by each file's content hash.

    Like git's index, a file whose (size, mtime, inode) is unchanged is trusted
    not to have changed, so a repeated run reads no module bytes at all.
    """

    def __init__(self, root: Path) -> None:
        key = hashlib.sha256(f"{READER_VERSION}:{root.resolve()}".encode()).hexdigest()[:24]
        self.path = cache_subdir("module-index") / f"{key}.marshal"
        # path -> ((size, mtime_ns, inode), module record)
        self.entries: dict[str, tuple[tuple[int, int, int], _Record]] = {}
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        # The collector would walk the growing heap again and again while
        # thousands of objects are rebuilt; none of them form cycles.
        gc.disable()
        try:
            loaded = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            loaded = {}
        finally:
            gc.enable()
        if isinstance(loaded, dict):
            self.entries = loaded

    def lookup(self, path: str) -> ModuleInfo | None:
        """The cached parse of *path* if the file is unchanged; None otherwise,
        including for an entry of an unexpected shape (a damaged index)."""
        try:
            key, record = self.entries[path]
            if key != _stat_key(path):
                return None
            return _from_record(record)
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def save(self, modules: list[tuple[str, ModuleInfo]]) -> None:
        entries = {path: (_stat_key(path), _to_record(module)) for path, module in modules}
        atomic_write_bytes(self.path, marshal.dumps(entries))


def read_module_tree(
    root: Path, *, jobs: int | None = None, index: bool = True
) -> list[ModuleInfo]:
    """All modules under *root*, in path order, using and refreshing the index
    (``index=False`` parses every file, as a first run would)."""
    files = find_module_files(root)
    module_index = ModuleIndex(root) if index else None
    results: dict[str, ModuleInfo] = {}
    todo: list[str] = []
    # Rebuilding thousands of modules from the index allocates ~20,000 objects,
    # none in cycles: without the collector this loop takes half the time.
    gc.disable()
    try:
        for f in files:
            cached = module_index.lookup(f) if module_index else None
            if cached is not None:
                results[f] = cached
            else:
                todo.append(f)
    finally:
        gc.enable()
    if todo:
        for f, parsed in zip(todo, parse_paths(todo, jobs=jobs), strict=True):
            if isinstance(parsed, UserError):
                raise parsed
            results[f] = parsed
        if module_index:
            module_index.save([(f, results[f]) for f in files])
    return [results[f] for f in files]


def _parse_records(paths: list[str]) -> list[_Record | UserError]:
    """Worker body for a process pool: modules travel back as plain records,
    which pickle several times faster than dataclass instances."""
    return [m if isinstance(m, UserError) else _to_record(m) for m in _parse_many(paths)]


def parse_paths(paths: list[str], *, jobs: int | None = None) -> list[ModuleInfo | UserError]:
    """Parse module files on up to *jobs* processes (default: every core)."""
    workers = jobs or os.cpu_count() or 1
    if workers == 1 or len(paths) < PARALLEL_THRESHOLD:
        return _parse_many(paths)
    # Interleaved chunks balance the load: big modules cluster in some directories.
    # (Threads would share no pickling, but parsing holds the GIL: measured slower.)
    chunks = [paths[i::workers * 4] for i in range(workers * 4)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_parse_records, chunks))
    by_path: dict[str, ModuleInfo | UserError] = {}
    for chunk, part in zip(chunks, parts, strict=True):
        by_path.update(
            (p, r if isinstance(r, UserError) else _from_record(r))
            for p, r in zip(chunk, part, strict=True)
        )
    return [by_path[p] for p in paths]
