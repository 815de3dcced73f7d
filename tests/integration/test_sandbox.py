"""Hostile module sources in the real bubblewrap sandbox.

Each test runs a tiny Makefile or script that does what a malicious or broken
module source might: reach the network, write outside its build directory,
read secrets, fork-bomb, spin, flood its output.  Each must end as a failure
or a limit, and the host must be exactly as before -- checked on the host,
not by trusting the sandboxed command's word.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.build.sandbox import Limits, Mount, SandboxResult, run_sandboxed
from kmodgate.errors import InfraError

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("bwrap")
    require_tool("make")


def make(workdir: Path, recipe: str, *, limits: Limits = Limits(wall_seconds=60),  # noqa: B008
         mounts: tuple[Mount, ...] = ()) -> SandboxResult:
    """Run a one-target Makefile whose recipe is *recipe* (one shell line per line)."""
    lines = "".join(f"\t{line}\n" for line in recipe.strip().splitlines())
    (workdir / "Makefile").write_text(f"SHELL := /bin/bash\nall:\n{lines}")
    return run_sandboxed(["make", "-C", str(workdir)], workdir=workdir, mounts=mounts,
                         limits=limits)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains *marker*."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.5)
    try:
        yield sock
    finally:
        sock.close()


def test_workdir_is_writable_and_result_is_reported(tmp_path: Path) -> None:
    result = make(tmp_path, "echo built > $(CURDIR)/out.txt\necho done")
    assert result.ok, result.output
    assert result.returncode == 0
    assert b"done" in result.output
    assert (tmp_path / "out.txt").read_text() == "built\n"
    assert not result.timed_out and result.limit_hit is None
    assert result.wall_seconds < 30


def test_failure_is_a_result_not_an_exception(tmp_path: Path) -> None:
    result = make(tmp_path, "echo about to fail\nfalse")
    assert result.returncode == 2  # make's status for a failed recipe
    assert b"about to fail" in result.output
    assert not result.ok


def test_extra_fd_is_a_separate_channel(tmp_path: Path) -> None:
    channel = tmp_path.parent / f"{tmp_path.name}-channel"
    result = run_sandboxed(
        ["bash", "-c", 'echo noise; echo payload >&"$KMODGATE_RESULT_FD"'],
        workdir=tmp_path, extra_fd_file=channel,
    )
    assert result.ok
    assert channel.read_text() == "payload\n"
    assert b"payload" not in result.output


def test_loopback_listener_on_the_host_is_not_reachable(tmp_path: Path) -> None:
    with listener() as sock:
        port = sock.getsockname()[1]
        result = make(tmp_path, f"@exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED",
                      limits=Limits(wall_seconds=30))
        assert result.returncode != 0
        assert b"CONNECTED" not in result.output
        with pytest.raises(TimeoutError):
            sock.accept()


def test_external_address_is_not_reachable(tmp_path: Path) -> None:
    # An address literal, so the test does not depend on DNS either way.
    result = make(tmp_path, "@exec 3<>/dev/tcp/192.0.2.1/80 && echo CONNECTED",
                  limits=Limits(wall_seconds=30))
    assert result.returncode != 0
    assert b"CONNECTED" not in result.output
    assert b"unreachable" in result.output.lower()
    assert result.wall_seconds < 20  # refused at once, not a slow connect timeout


def test_writes_to_home_and_kernel_tree_fail_and_host_is_untouched(tmp_path: Path) -> None:
    ktree = tmp_path / "ktree"
    ktree.mkdir()
    (ktree / "Makefile").write_text("include /usr/src/linux-headers-common/Makefile\n")
    before = (ktree / "Makefile").read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    home = Path(os.environ.get("HOME", "/root"))
    marker = f"kmodgate-sandbox-{secrets.token_hex(6)}"
    target = "/usr/src/linux-headers-6.1.0-99-amd64"
    result = make(
        work,
        f"-touch $$HOME/{marker}\n"
        f"-touch {home}/{marker}\n"
        f"-touch /root/{marker}\n"
        f"-echo evil >> {target}/Makefile\n"
        f"-touch {target}/{marker}\n"
        f"-touch {ktree}/{marker}\n"
        f"-touch /etc/{marker}\n"
        f"-touch /usr/src/{marker}",
        mounts=(Mount(ktree, target),),
    )
    assert result.returncode == 0  # every write failed, '-' let make go on
    text = result.output.decode()
    assert text.count("Permission denied") + text.count("Read-only file system") \
        + text.count("No such file or directory") >= 7
    for host_path in (home / marker, Path("/root") / marker, ktree / marker,
                      Path("/etc") / marker, Path("/usr/src") / marker):
        assert not host_path.exists(), host_path
    assert (ktree / "Makefile").read_bytes() == before
    assert sorted(p.name for p in ktree.iterdir()) == ["Makefile"]


def test_secrets_outside_the_sandbox_are_not_readable(tmp_path: Path) -> None:
    home = Path("/root") if os.geteuid() == 0 else Path.home()
    secret_value = secrets.token_hex(16)
    secret = home / f".kmodgate-sandbox-secret-{secrets.token_hex(4)}"
    secret.write_text(secret_value)
    secret.chmod(0o600)
    try:
        result = make(tmp_path, f"-@cat {secret}\n-@cat /etc/shadow\n-@ls -a {home} | sed s/^/LS:/")
    finally:
        secret.unlink()
    assert secret_value.encode() not in result.output
    # Not merely unreadable: $HOME is an empty tmpfs inside.
    assert f"{secret}: No such file or directory".encode() in result.output
    assert f"LS:{secret.name}".encode() not in result.output
    if Path("/etc/shadow").exists() and os.geteuid() == 0:
        shadow = Path("/etc/shadow").read_bytes()
        root_line = shadow.split(b"\n", 1)[0]
        assert root_line not in result.output
    assert b"Permission denied" in result.output or b"No such file" in result.output


def test_fork_bomb_is_stopped_and_reaped(tmp_path: Path) -> None:
    marker = f"kmodgate_bomb_{secrets.token_hex(4)}"
    script = tmp_path / f"{marker}.sh"
    # The bomb keeps its parent alive (sleep) so it is not simply ended by the
    # command exiting: the process cap has to stop it.
    script.write_text(f"{marker}() {{ {marker} | {marker} & }}\n{marker}\nsleep 300\n")
    start = time.monotonic()
    result = make(tmp_path, f"bash {script}",
                  limits=Limits(wall_seconds=120, processes=64))
    elapsed = time.monotonic() - start
    assert result.limit_hit == "processes"
    assert result.returncode is None
    assert elapsed < 30
    time.sleep(0.5)
    assert processes_with(marker) == []
    # The host can still start processes.
    assert os.system("true") == 0


def test_infinite_loop_times_out_and_whole_tree_dies(tmp_path: Path) -> None:
    marker = f"kmodgate_spin_{secrets.token_hex(4)}"
    # A detached daemon (setsid, its own session) and a busy loop: both must die.
    script = tmp_path / f"{marker}.sh"
    script.write_text(f"setsid sleep 3000 &\n(exec -a {marker} sleep 3000) &\n"
                      "while :; do :; done\n")
    result = make(tmp_path, f"bash {script}", limits=Limits(wall_seconds=2))
    assert result.timed_out
    assert result.limit_hit == "wall time"
    assert result.returncode is None
    assert result.wall_seconds < 15
    time.sleep(0.5)
    assert processes_with(marker) == []
    assert processes_with(str(script)) == []


def test_cpu_time_is_limited_over_the_whole_tree(tmp_path: Path) -> None:
    result = make(tmp_path, "bash -c 'for i in 1 2; do (while :; do :; done) & done; wait'",
                  limits=Limits(wall_seconds=60, cpu_seconds=2))
    assert result.limit_hit == "cpu time"
    assert 2 <= result.cpu_seconds < 10


def test_gigabytes_of_output_are_cut_and_memory_stays_bounded(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    cap = 1 << 20
    result = make(tmp_path, "head -c 4G /dev/zero | tr '\\0' x",
                  limits=Limits(wall_seconds=60, output_bytes=cap))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.limit_hit == "output"
    assert result.output_truncated
    assert len(result.output) == cap
    assert result.returncode is None
    assert result.wall_seconds < 30  # killed at the cap, not after 4 GB
    assert (after - before) * 1024 < 64 << 20


def test_memory_per_process_is_bounded(tmp_path: Path) -> None:
    result = run_sandboxed(
        ["python3", "-c", "bytearray(2 << 30)"], workdir=tmp_path,
        limits=Limits(memory_bytes=512 << 20),
    )
    assert result.returncode != 0
    assert b"MemoryError" in result.output


def test_missing_bubblewrap_is_an_infrastructure_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(InfraError, match="bwrap is not installed"):
        run_sandboxed(["true"], workdir=tmp_path)


def test_mount_at_a_new_path_keeps_the_host_directory_visible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Module.symvers").write_text("0x1\tsym\tvmlinux\tEXPORT_SYMBOL\t\n")
    work = tmp_path / "work"
    target = f"/usr/local/kmodgate-{secrets.token_hex(4)}"
    result = run_sandboxed(["bash", "-c", f"cat {target}/Module.symvers; ls /usr/local"],
                           workdir=work, mounts=[Mount(tree, target)])
    assert result.ok, result.output
    assert b"EXPORT_SYMBOL" in result.output
    listed = set(result.output.decode().split())
    assert set(os.listdir("/usr/local")) <= listed
    assert not Path(target).exists()  # nothing was created on the host


def test_host_kernel_trees_are_hidden(tmp_path: Path) -> None:
    result = run_sandboxed(["bash", "-c", "ls -A /usr/src /lib/modules | grep -v : | wc -w"],
                           workdir=tmp_path)
    assert result.output.strip() == b"0"
