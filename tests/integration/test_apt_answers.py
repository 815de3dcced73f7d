"""apt-cache's answers are kept per state of apt's lists and survive damage."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kmodgate.sources import debian

pytestmark = pytest.mark.integration


def test_answers_are_kept_per_apt_lists_state_and_damage_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMODGATE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(debian, "_apt", debian._AptAnswers())
    releases = debian.available_kernel_releases("amd64")
    assert releases and all(debian.RELEASE_RE.match(r) for r in releases)
    stored = tmp_path / "apt" / f"{debian.apt_lists_state()}.json"
    assert json.loads(stored.read_text())["releases:amd64"] == releases
    info = debian.package_info(f"linux-headers-{releases[-1]}")
    assert info is not None and info.version
    assert debian.package_info("kmodgate-no-such-package") is None

    # A new process (a fresh memo) reads the answers back from disk...
    monkeypatch.setattr(debian, "_apt", debian._AptAnswers())
    assert debian.package_info(f"linux-headers-{releases[-1]}") == info
    # ...and a damaged file is recomputed, not an error.
    stored.write_text("{not json")
    monkeypatch.setattr(debian, "_apt", debian._AptAnswers())
    assert debian.available_kernel_releases("amd64") == releases


def _deb(root: Path, name: str, content: str) -> Path:
    tree = root / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test package\n")
    (tree / "usr/share/kmodgate-test").mkdir(parents=True)
    (tree / "usr/share/kmodgate-test/file").write_text(content)
    out = root / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(out)],
                   check=True, capture_output=True)
    return out


def test_unpack_remembers_digests_but_never_serves_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMODGATE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "package.deb"
    shutil.copy(_deb(tmp_path, "first", "one"), path)
    first = debian.unpack(path)
    assert debian.unpack(path) == first  # remembered, same tree
    shutil.copy(_deb(tmp_path, "second", "two, longer"), path)  # same path, new content
    second = debian.unpack(path)
    assert second != first
    assert (second / "usr/share/kmodgate-test/file").read_text() == "two, longer"
