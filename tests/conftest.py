"""Shared test set-up: one download cache for the whole run, tool requirements."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
# Downloads (kernel packages from the archive) are shared by every test of a run
# and kept between runs; tests never hard-code a mirror, apt decides.
TEST_CACHE = Path(os.environ.get("KMODGATE_TEST_CACHE", REPO / ".cache" / "kmodgate"))
os.environ["KMODGATE_CACHE_DIR"] = str(TEST_CACHE)
TEST_CACHE.mkdir(parents=True, exist_ok=True)

IN_CI = bool(os.environ.get("CI"))

# Fixtures shared by several test modules (the dashboard's store scenario).
pytest_plugins = ["web_fixtures"]


def missing(reason: str) -> NoReturn:
    """A test's prerequisite is absent: skip with the reason, but never in CI,
    where .ci/run installs everything and an absence is a failure."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The tool's path, or the test stops as missing() says."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (scripts/apt-packages.txt lists it)")
    return path


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return TEST_CACHE


def archive_releases(series: str, flavour: str = "amd64") -> list[str]:
    """The releases of *series* ("6.1.") in *flavour* the archive offers now, oldest
    first; the test skips with the reason if there are none (the archive's window
    moves, so tests discover ABIs instead of naming them)."""
    from kmodgate.sources import debian

    found = [r for r in debian.available_kernel_releases(flavour) if r.startswith(series)]
    if not found:
        pytest.skip(f"the archive offers no {series} {flavour} kernel today")
    return found
