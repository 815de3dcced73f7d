"""Module source references: directories, git commits, tarballs, Debian packages."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.errors import UserError
from kmodgate.sources.module_sources import load_source, tree_sha256

pytestmark = pytest.mark.integration

CONF = 'PACKAGE_NAME="hello"\nPACKAGE_VERSION="0.3"\nBUILT_MODULE_NAME[0]=hello\n'


def write_tree(root: Path, conf: str = CONF) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dkms.conf").write_text(conf)
    (root / "Makefile").write_text("obj-m += hello.o\n")
    (root / "hello.c").write_text("int x;\n")
    return root


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        check=True, capture_output=True, text=True).stdout.strip()


def test_directory(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "hello")
    src = load_source(str(tree))
    assert (src.name, src.version, src.tree, src.commit, src.build_depends) == (
        "hello", "0.3", tree.resolve(), None, ())
    assert src.tree_hash == tree_sha256(tree)


def test_directory_without_dkms_conf(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no dkms\.conf"):
        load_source(str(tmp_path))


def test_non_literal_name_falls_back_to_directory(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "mymod", 'PACKAGE_NAME="$(echo x)"\nPACKAGE_VERSION=1\n')
    src = load_source(str(tree))
    assert (src.name, src.version) == ("mymod", "1")


def test_tree_hash_is_content_only(tmp_path: Path) -> None:
    a = write_tree(tmp_path / "a")
    b = write_tree(tmp_path / "b")
    assert tree_sha256(a) == tree_sha256(b)
    (b / "hello.c").chmod(0o755)
    assert tree_sha256(a) != tree_sha256(b)
    (b / "hello.c").chmod(0o644)
    (b / "hello.c").write_text("int y;\n")
    assert tree_sha256(a) != tree_sha256(b)


def test_git_every_commit(tmp_path: Path) -> None:
    require_tool("git")
    repo = write_tree(tmp_path / "repo.git-work")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "v0.3")
    (repo / "hello.c").write_text("int z;\n")
    git(repo, "commit", "-q", "-am", "two")
    second = git(repo, "rev-parse", "HEAD")

    head = load_source(f"git+{repo}")
    assert head.commit == second
    assert head.version == f"0.3+g{second[:12]}"
    assert (head.tree / "hello.c").read_text() == "int z;\n"
    tagged = load_source(f"git+{repo}@v0.3")
    assert tagged.commit == first
    assert (tagged.tree / "hello.c").read_text() == "int x;\n"
    assert tagged.tree_hash != head.tree_hash
    by_sha = load_source(f"git+{repo}@{first}")
    assert by_sha.tree == tagged.tree  # keyed by commit: extracted once

    # A new commit on the branch is seen: branches are refreshed.
    (repo / "hello.c").write_text("int w;\n")
    git(repo, "commit", "-q", "-am", "three")
    assert load_source(f"git+{repo}@main").commit == git(repo, "rev-parse", "HEAD")

    with pytest.raises(UserError, match="no commit, branch or tag 'nope'"):
        load_source(f"git+{repo}@nope")
    with pytest.raises(UserError, match="no such git repository"):
        load_source(f"git+{tmp_path / 'absent'}@main")


def test_git_dkms_conf_in_a_subdirectory(tmp_path: Path) -> None:
    require_tool("git")
    repo = tmp_path / "proj"
    write_tree(repo / "driver")
    (repo / "README").write_text("x\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    src = load_source(f"git+{repo}")
    assert src.tree.name == "driver"
    assert src.name == "hello"


def make_tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE,
           link: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info, data


def test_tarball(tmp_path: Path) -> None:
    ball = make_tarball(tmp_path / "hello-0.3.tar.gz", [
        member("hello-0.3/dkms.conf", CONF.encode(), mode=0o600),
        member("hello-0.3/hello.c", b"int x;\n"),
        member("hello-0.3/link", kind=tarfile.SYMTYPE, link="hello.c"),
    ])
    src = load_source(str(ball))
    assert (src.name, src.version, src.tree.name) == ("hello", "0.3", "hello-0.3")
    # Readable by the sandbox's unprivileged uid whatever the archive said.
    assert (src.tree / "dkms.conf").stat().st_mode & 0o004
    assert load_source(str(ball)).tree == src.tree


@pytest.mark.parametrize("evil", [
    member("/etc/kmodgate-evil", b"x"),
    member("../kmodgate-evil", b"x"),
    member("hello/escape", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    member("hello/escape", kind=tarfile.SYMTYPE, link="../../../../etc"),
    member("hello/hard", kind=tarfile.LNKTYPE, link="/etc/passwd"),
    member("hello/dev", kind=tarfile.CHRTYPE),
])
def test_hostile_tarball_is_refused(tmp_path: Path,
                                    evil: tuple[tarfile.TarInfo, bytes]) -> None:
    ball = make_tarball(tmp_path / "evil.tar.gz",
                        [member("hello/dkms.conf", CONF.encode()), evil])
    with pytest.raises(UserError, match="cannot extract the tarball safely"):
        load_source(str(ball))
    assert not Path("/etc/kmodgate-evil").exists()
    assert not (tmp_path.parent / "kmodgate-evil").exists()


def test_bad_tarball(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="cannot extract"):
        load_source(str(bad))
    with pytest.raises(UserError, match="no such tarball"):
        load_source(str(tmp_path / "absent.tar.gz"))


def test_unknown_reference(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a module source"):
        load_source(str(tmp_path / "nothing-here"))


def test_debian_package() -> None:
    require_tool("apt-get")
    src = load_source("debian:acpi-call-dkms")
    assert src.name == "acpi-call"
    assert src.version.startswith("1.2.2-")  # the Debian package version
    assert src.tree.name == "acpi-call-1.2.2"
    assert (src.tree / "dkms.conf").is_file()
    assert src.build_depends == ()
    west = load_source("debian:west-chamber-dkms")
    assert "xtables-addons-dkms" in west.build_depends
    assert "dkms" not in west.build_depends


def test_unknown_debian_package() -> None:
    require_tool("apt-get")
    with pytest.raises(UserError, match="no package kmodgate-no-such-dkms"):
        load_source("debian:kmodgate-no-such-dkms")


def test_debian_package_without_dkms_conf() -> None:
    require_tool("apt-get")
    with pytest.raises(UserError, match=r"contains no dkms\.conf"):
        load_source("debian:dh-dkms")
