"""Mount targets the host also has, below a directory the sandbox hides.

A host with kernel headers installed has /usr/src/linux-headers-<abi>-common
itself.  The sandbox empties its /usr/src, so such a target must still get a
mount point there: a build once failed with "bwrap: Can't mkdir …: Read-only
file system" on exactly the kernels whose headers the host had installed.
And bubblewrap failing to set a mount up is kmodgate's failure, never the
module's.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.build.kernel_tree import placeable_mounts
from kmodgate.build.sandbox import Mount, run_sandboxed
from kmodgate.errors import InfraError

pytestmark = pytest.mark.integration


@pytest.fixture
def host_dir_in_usr_src() -> Iterator[Path]:
    """A directory the host has below /usr/src, removed afterwards."""
    path = Path("/usr/src") / f"kmodgate-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except PermissionError:
        pytest.skip("creating a directory in /usr/src needs root")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_target_the_host_has_below_a_hidden_dir_is_mounted(
    host_dir_in_usr_src: Path, tmp_path: Path
) -> None:
    require_tool("bwrap")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text("# the kernel's\n")
    tree.chmod(0o755)
    tmp_path.chmod(0o755)
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    (other / "marker").write_text("other tree\n")
    # One target the host has (the case that failed), one it has not.
    mounts = placeable_mounts([
        Mount(tree, str(host_dir_in_usr_src)),
        Mount(other, "/usr/src/kmodgate-test-absent-on-host"),
    ])
    work = tmp_path / "work"
    work.mkdir(mode=0o777)
    result = run_sandboxed(
        ["sh", "-c", f"cat {host_dir_in_usr_src}/Makefile "
                     "/usr/src/kmodgate-test-absent-on-host/marker"],
        workdir=work, mounts=mounts)
    assert result.ok, result.output
    assert result.output.decode() == "# the kernel's\nother tree\n"


def test_bwrap_failing_to_mount_is_an_infrastructure_error(tmp_path: Path) -> None:
    require_tool("bwrap")
    work = tmp_path / "work"
    work.mkdir(mode=0o777)
    # A mount point below a regular file: bwrap's child fails to create it
    # after bwrap has reported the child's pid, so only its own "bwrap: "
    # message tells the setup failed.
    source = tmp_path / "src"
    source.mkdir(mode=0o755)
    with pytest.raises(InfraError, match="bubblewrap could not set up the sandbox"):
        run_sandboxed(["true"], workdir=work, mounts=[Mount(source, "/etc/hostname/x")])
