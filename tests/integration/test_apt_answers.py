"""apt-cache's answers are kept per state of apt's lists and survive damage."""

from __future__ import annotations

import json
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
