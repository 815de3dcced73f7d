"""ModuleIndex: a repeated read of a module tree re-parses only what changed."""

from __future__ import annotations

import dataclasses
import marshal
import os
import sys
from pathlib import Path

import pytest

from elfwriter import ExportSpec, ModuleSpec, build_module
from kmodgate.sources.modules import (
    PARALLEL_THRESHOLD,
    ModuleIndex,
    find_module_files,
    read_module_file,
    read_module_tree,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KMODGATE_CACHE_DIR", str(cache))
    return cache


def make_tree(root: Path, count: int = 3) -> list[Path]:
    paths = []
    for i in range(count):
        sub = root / "kernel" / ("drivers" if i % 2 else "fs")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"mod{i:03d}.ko"
        path.write_bytes(build_module(ModuleSpec(
            name=f"mod{i:03d}", undefined=["_printk"],
            versions=[("module_layout", 1), ("_printk", 100 + i)],
            exports=[ExportSpec(f"mod{i:03d}_fn", crc=i, gpl=bool(i % 2))],
        )))
        paths.append(path)
    (root / "README").write_text("not a module\n")
    return paths


def index_files(cache: Path) -> list[Path]:
    return sorted((cache / "module-index").glob("*.marshal"))


def test_tree_is_read_in_path_order(tmp_path: Path) -> None:
    paths = make_tree(tmp_path / "tree", 4)
    modules = read_module_tree(tmp_path / "tree")
    assert [m.path for m in modules] == sorted(str(p) for p in paths)
    assert modules == [read_module_file(Path(m.path)) for m in modules]


def test_repeated_read_is_equal_and_served_from_the_index(
    tmp_path: Path, private_cache: Path
) -> None:
    root = tmp_path / "tree"
    paths = make_tree(root)
    first = read_module_tree(root)
    [index_path] = index_files(private_cache)
    assert read_module_tree(root) == first

    # The index trusts (size, mtime, inode) as git does: rewrite a file in place with
    # different bytes of the same size and put its mtime back, and the cached parse is
    # what comes back, proving the file was not read again.
    stale = paths[0]
    before = stale.stat()
    data = bytearray(stale.read_bytes())
    pos = data.index(b"mod000\0")
    data[pos : pos + 6] = b"modXYZ"
    stale.write_bytes(bytes(data))
    os.utime(stale, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stale.stat().st_size == before.st_size
    mtime_of_index = index_path.stat().st_mtime_ns
    assert read_module_tree(root) == first
    assert index_path.stat().st_mtime_ns == mtime_of_index  # nothing re-parsed, nothing saved

    # A changed file (new mtime) is parsed again and the result shows the change;
    # the other files still come from the index (the stale one keeps its old parse).
    changed = paths[1]
    changed.write_bytes(build_module(ModuleSpec(name="renamed", undefined=["other_fn"])))
    third = read_module_tree(root)
    old = {m.path: m for m in first}
    new = {m.path: m for m in third}
    assert new[str(stale)] == old[str(stale)]  # still the cached parse of the stale file
    assert new[str(stale)].name == "mod000"
    assert new[str(changed)].name == "renamed"
    assert new[str(changed)].undefined == ["other_fn"]
    assert new[str(changed)].sha256 != old[str(changed)].sha256
    assert new[str(paths[2])] == old[str(paths[2])]
    assert read_module_tree(root) == third


def test_new_and_removed_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    paths = make_tree(root)
    read_module_tree(root)
    paths[0].unlink()
    extra = root / "extra" / "new.ko"
    extra.parent.mkdir()
    extra.write_bytes(build_module(ModuleSpec(name="new")))
    names = [m.name for m in read_module_tree(root)]
    assert sorted(names) == ["mod001", "mod002", "new"]


def test_index_is_per_tree(tmp_path: Path, private_cache: Path) -> None:
    make_tree(tmp_path / "a", 1)
    make_tree(tmp_path / "b", 2)
    assert len(read_module_tree(tmp_path / "a")) == 1
    assert len(read_module_tree(tmp_path / "b")) == 2
    assert len(index_files(private_cache)) == 2


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"not marshal at all \xff\xfe", marshal.dumps([1, 2, 3])[:-1],
     marshal.dumps([1, 2, 3]), marshal.dumps("a string"), marshal.dumps({"x": 1})],
    ids=["empty", "nul", "random", "truncated", "list", "string", "unrelated-dict"],
)
def test_corrupt_index_file_is_ignored(
    tmp_path: Path, private_cache: Path, garbage: bytes
) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    expected = read_module_tree(root)
    [index_path] = index_files(private_cache)
    index_path.write_bytes(garbage)
    assert read_module_tree(root) == expected
    # ...and rewritten, so the next run uses it again.
    assert ModuleIndex(root).entries.keys() == {m.path for m in expected}


def _wrong_shape_entries(paths: list[str]) -> dict[str, object]:
    return {paths[0]: 5, paths[1]: (), paths[2]: ((1, 2, 3), "not a record")}


def test_index_with_wrong_shaped_entries_is_ignored(
    tmp_path: Path, private_cache: Path
) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    expected = read_module_tree(root)
    [index_path] = index_files(private_cache)
    index_path.write_bytes(marshal.dumps(_wrong_shape_entries(find_module_files(root))))
    assert read_module_tree(root) == expected


def test_index_record_of_an_old_layout_is_reparsed(tmp_path: Path, private_cache: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    expected = read_module_tree(root)
    [index_path] = index_files(private_cache)
    entries = marshal.loads(index_path.read_bytes())
    entries = {p: (key, (*record, "extra field")) for p, (key, record) in entries.items()}
    index_path.write_bytes(marshal.dumps(entries))
    assert read_module_tree(root) == expected


def test_parallel_parse_equals_serial(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root, PARALLEL_THRESHOLD + 2)
    parallel = read_module_tree(root, jobs=2)
    assert len(parallel) == PARALLEL_THRESHOLD + 2
    serial = [read_module_file(Path(m.path)) for m in parallel]
    assert parallel == serial
    assert [dataclasses.replace(m, sha256=None) for m in read_module_tree(root, jobs=2)] == [
        dataclasses.replace(m, sha256=None) for m in serial
    ]


def test_bad_file_in_tree_names_itself(tmp_path: Path) -> None:
    from kmodgate.errors import UserError

    root = tmp_path / "tree"
    make_tree(root)
    bad = root / "kernel" / "zz-bad.ko"
    bad.write_bytes(b"not an elf file")
    with pytest.raises(UserError) as info:
        read_module_tree(root)
    assert info.value.where == str(bad)


@pytest.mark.skipif(sys.platform != "linux", reason="fork-based pool assumed")
def test_bad_file_in_parallel_tree_names_itself(tmp_path: Path) -> None:
    from kmodgate.errors import UserError

    root = tmp_path / "tree"
    make_tree(root, PARALLEL_THRESHOLD)
    bad = root / "kernel" / "zz-bad.ko.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 corrupt")
    with pytest.raises(UserError) as info:
        read_module_tree(root, jobs=2)
    assert info.value.where == str(bad)


def test_without_index_every_file_is_parsed(tmp_path: Path, private_cache: Path) -> None:
    root = tmp_path / "tree"
    paths = make_tree(root)
    first = read_module_tree(root)
    # The stale-stat trick again: only a parse without the index sees the new bytes.
    before = paths[0].stat()
    data = paths[0].read_bytes().replace(b"mod000\0", b"modXYZ\0")
    paths[0].write_bytes(data)
    os.utime(paths[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert read_module_tree(root) == first
    fresh = {m.path: m for m in read_module_tree(root, index=False)}
    assert fresh[str(paths[0])].name == "modXYZ"
