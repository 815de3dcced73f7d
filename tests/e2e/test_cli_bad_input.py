"""Bad input through the real ``kmodgate`` command (issue 2).

Every case must exit 2 with exactly one line on stderr, starting
"kmodgate: error:" and naming the input at fault; no traceback anywhere and,
for --json runs, nothing on stdout.  Also the exit codes of ``check``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from elfwriter import ModuleSpec, build_module

pytestmark = pytest.mark.e2e

LAYOUT_CRC = 0x7C797B6A
PRINTK_CRC = 0x92997ED8
NOBODY = 65534


def kmodgate_command() -> str:
    beside = Path(sys.executable).parent / "kmodgate"
    if beside.exists():
        return str(beside)
    found = shutil.which("kmodgate")
    if found is None:
        pytest.skip("the kmodgate console script is not installed (pip install -e .)")
    return found


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def run(args: list[str], *, cwd: Path, env: dict[str, str], prefix: list[str] | None = None,
        ) -> Run:
    proc = subprocess.run([*(prefix or []), kmodgate_command(), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: Run, names: str, *, json_run: bool = True) -> None:
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("kmodgate: error:"), lines[0]
    assert names in lines[0], lines[0]
    if json_run:
        assert result.stdout == ""


def symvers_text(*, printk_crc: int = PRINTK_CRC) -> str:
    return (
        f"0x{LAYOUT_CRC:08x}\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n"
        f"0x{printk_crc:08x}\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n"
        "0x12345678\tusb_register_driver\tdrivers/usb/core/usbcore\tEXPORT_SYMBOL_GPL\t\n"
    )


def module_bytes(*, printk_crc: int = PRINTK_CRC, name: str = "synth") -> bytes:
    return build_module(ModuleSpec(
        name=name, undefined=["_printk", "usb_register_driver"],
        versions=[("module_layout", LAYOUT_CRC), ("_printk", printk_crc),
                  ("usb_register_driver", 0x12345678)],
    ))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "Module.symvers").write_text(symvers_text())
    (tmp_path / "good.ko").write_bytes(module_bytes())
    return tmp_path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    cache = tmp_path / "cache"
    cache.mkdir()
    out = {k: v for k, v in os.environ.items() if k != "KMODGATE_DEBUG"}
    out["KMODGATE_CACHE_DIR"] = str(cache)
    out["COLUMNS"] = "200"
    return out


def test_not_an_elf_file(work: Path, env: dict[str, str]) -> None:
    (work / "notelf.ko").write_text("hello, not an ELF file\n")
    result = run(["inspect", "module", "--json", "notelf.ko"], cwd=work, env=env)
    assert_user_error(result, "notelf.ko: not an ELF file")


def test_truncated_elf(work: Path, env: dict[str, str]) -> None:
    (work / "trunc.ko").write_bytes(module_bytes()[:300])
    result = run(["check", "--json", "-k", "Module.symvers", "-m", "trunc.ko"], cwd=work,
                 env=env)
    assert_user_error(result, "trunc.ko: truncated")


def test_corrupt_xz(work: Path, env: dict[str, str]) -> None:
    (work / "bad.ko.xz").write_bytes(b"\xfd7zXZ\x00" + b"this is not xz data" * 4)
    result = run(["inspect", "module", "--json", "bad.ko.xz"], cwd=work, env=env)
    assert_user_error(result, "bad.ko.xz: corrupt xz data")


def test_corrupt_zst(work: Path, env: dict[str, str]) -> None:
    (work / "bad.ko.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"this is not zstd data" * 4)
    result = run(["inspect", "module", "--json", "bad.ko.zst"], cwd=work, env=env)
    assert_user_error(result, "bad.ko.zst: corrupt zstd data")


def test_truncated_zst(work: Path, env: dict[str, str]) -> None:
    packed = zstandard.ZstdCompressor().compress(module_bytes())
    (work / "cut.ko.zst").write_bytes(packed[: len(packed) // 2])
    result = run(["inspect", "module", "--json", "cut.ko.zst"], cwd=work, env=env)
    assert_user_error(result, "cut.ko.zst: ")


def test_corrupt_gz(work: Path, env: dict[str, str]) -> None:
    packed = gzip.compress(module_bytes())
    (work / "bad.ko.gz").write_bytes(packed[:20] + b"\xff" * 40 + packed[60:])
    result = run(["inspect", "module", "--json", "bad.ko.gz"], cwd=work, env=env)
    assert_user_error(result, "bad.ko.gz: corrupt gzip data")


def test_symvers_malformed_line_3(work: Path, env: dict[str, str]) -> None:
    lines = symvers_text().splitlines()
    lines[2] = "0x12345678 usb_register_driver with spaces, not tabs"
    (work / "bad.symvers").write_text("\n".join(lines) + "\n")
    result = run(["check", "--json", "-k", "bad.symvers", "-m", "good.ko"], cwd=work, env=env)
    assert_user_error(result, "bad.symvers:3: malformed Module.symvers line")


def test_unknown_debian_release(work: Path, env: dict[str, str]) -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache is not installed: debian: references need apt")
    result = run(["inspect", "kernel", "--json", "debian:0.0.0-0-nonexistent"], cwd=work,
                 env=env)
    assert_user_error(result, "0.0.0-0-nonexistent")


def test_malformed_debian_release(work: Path, env: dict[str, str]) -> None:
    result = run(["inspect", "kernel", "--json", "debian:not a release"], cwd=work, env=env)
    assert_user_error(result, "'not a release'")


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "module", "--json", "missing.ko"],
        ["inspect", "kernel", "--json", "missing.ko"],
        ["check", "--json", "-k", "Module.symvers", "-m", "missing.ko"],
        ["check", "--json", "-k", "missing.ko", "-m", "good.ko"],
    ],
    ids=["inspect-module", "inspect-kernel", "check-module", "check-kernel"],
)
def test_nonexistent_path(work: Path, env: dict[str, str], args: list[str]) -> None:
    assert_user_error(run(args, cwd=work, env=env), "missing.ko: no such file")


def test_directory_where_a_file_is_expected(work: Path, env: dict[str, str]) -> None:
    (work / "adir").mkdir()
    result = run(["diff", "--json", "Module.symvers", "Module.symvers", "--stablelist", "adir"],
                 cwd=work, env=env)
    assert_user_error(result, "adir: is a directory")


def test_directory_without_a_kernel_tree(work: Path, env: dict[str, str]) -> None:
    (work / "adir").mkdir()
    result = run(["check", "--json", "-k", "adir", "-m", "good.ko"], cwd=work, env=env)
    assert_user_error(result, "adir: no kernel build tree here")


def test_module_directory_without_modules(work: Path, env: dict[str, str]) -> None:
    (work / "empty").mkdir()
    result = run(["check", "--json", "-k", "Module.symvers", "-m", "empty"], cwd=work, env=env)
    assert_user_error(result, "empty")


# ---------------------------------------------------------------------------
# A file the user cannot read: as root permissions do not stop reads, so the
# command runs as nobody.


def unprivileged_prefix() -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "nobody", "--"]
    pytest.skip("neither setpriv nor runuser is installed: cannot run as an unprivileged user")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody can enter (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged user")
    path = Path(tempfile.mkdtemp(prefix="kmodgate-e2e-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nobody_env(env: dict[str, str], shared_dir: Path) -> dict[str, str]:
    cache = shared_dir / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    return {**env, "KMODGATE_CACHE_DIR": str(cache), "HOME": str(shared_dir)}


def _prepare(shared_dir: Path) -> None:
    for name, data in (("Module.symvers", symvers_text().encode()), ("good.ko", module_bytes())):
        (shared_dir / name).write_bytes(data)
        (shared_dir / name).chmod(0o644)


@pytest.mark.parametrize("role", ["module", "kernel"])
def test_unreadable_file(shared_dir: Path, nobody_env: dict[str, str], role: str) -> None:
    prefix = unprivileged_prefix()
    _prepare(shared_dir)
    secret = shared_dir / ("secret.ko" if role == "module" else "secret.symvers")
    secret.write_bytes(module_bytes() if role == "module" else symvers_text().encode())
    secret.chmod(0o600)
    args = (["check", "--json", "-k", "Module.symvers", "-m", secret.name] if role == "module"
            else ["check", "--json", "-k", secret.name, "-m", "good.ko"])
    result = run(args, cwd=shared_dir, env=nobody_env, prefix=prefix)
    assert_user_error(result, f"{secret.name}: cannot read: Permission denied")


@pytest.mark.parametrize("role", ["module", "kernel"])
def test_file_in_untraversable_directory(
    shared_dir: Path, nobody_env: dict[str, str], role: str
) -> None:
    prefix = unprivileged_prefix()
    _prepare(shared_dir)
    locked = shared_dir / "locked"
    locked.mkdir()
    secret = locked / ("secret.ko" if role == "module" else "Module.symvers")
    secret.write_bytes(module_bytes() if role == "module" else symvers_text().encode())
    secret.chmod(0o600)
    locked.chmod(0o700)
    ref = str(secret.relative_to(shared_dir))
    args = (["check", "--json", "-k", "Module.symvers", "-m", ref] if role == "module"
            else ["check", "--json", "-k", ref, "-m", "good.ko"])
    result = run(args, cwd=shared_dir, env=nobody_env, prefix=prefix)
    assert_user_error(result, f"{ref}: ")


def test_unprivileged_user_can_run_checks(shared_dir: Path, nobody_env: dict[str, str]) -> None:
    """The control for the two tests above: readable inputs work as nobody."""
    prefix = unprivileged_prefix()
    _prepare(shared_dir)
    result = run(["check", "--json", "-k", "Module.symvers", "-m", "good.ko"], cwd=shared_dir,
                 env=nobody_env, prefix=prefix)
    assert result.returncode == 0, result


# ---------------------------------------------------------------------------
# check's exit codes on good input.


def test_check_exit_0_when_all_pass(work: Path, env: dict[str, str]) -> None:
    (work / "other.ko").write_bytes(module_bytes(name="other"))
    result = run(["check", "--json", "-k", "Module.symvers", "-m", "good.ko", "-m", "other.ko"],
                 cwd=work, env=env)
    assert result.returncode == 0, result
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert [r["outcome"] for r in data["results"]] == ["pass", "pass"]
    assert data["results"][0]["needs_modules"] == ["usbcore"]


def test_check_exit_1_when_one_fails(work: Path, env: dict[str, str]) -> None:
    (work / "stale.ko").write_bytes(module_bytes(printk_crc=0x11111111, name="stale"))
    result = run(["check", "--json", "-k", "Module.symvers", "-m", "good.ko", "-m", "stale.ko"],
                 cwd=work, env=env)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    outcomes = {r["module"]: r["outcome"] for r in data["results"]}
    assert outcomes == {"synth": "pass", "stale": "fail"}
    [failed] = [r for r in data["results"] if r["outcome"] == "fail"]
    assert failed["reasons"][0]["code"] == "crc_mismatch"
    assert failed["reasons"][0]["required_crc"] == "0x11111111"


def test_check_table_output_exit_codes(work: Path, env: dict[str, str]) -> None:
    ok = run(["check", "-k", "Module.symvers", "-m", "good.ko"], cwd=work, env=env)
    assert ok.returncode == 0 and "Traceback" not in ok.stdout + ok.stderr
    (work / "stale.ko").write_bytes(module_bytes(printk_crc=0x11111111, name="stale"))
    bad = run(["check", "-k", "Module.symvers", "-m", "stale.ko"], cwd=work, env=env)
    assert bad.returncode == 1
    assert "disagrees about version of symbol _printk" in bad.stdout
