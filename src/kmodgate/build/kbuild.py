"""Build one cell: one module source against one kernel build tree.

The recipe is DKMS's own (dkms 3.0 ``prepare_build``/``actual_build``), so a
verdict here agrees with ``dkms build`` for the same module and kernel:

* copy the source into a fresh build directory at
  ``<dkms_tree>/<PACKAGE_NAME>/<PACKAGE_VERSION>/build`` and apply ``PATCH[#]``
  with ``patch -p1``;
* run ``MAKE[#]`` in that directory with ``make`` replaced by
  ``make -j<n> KERNELRELEASE=<release>`` and ``CC`` exported as the kernel's
  compiler;
* require every ``BUILT_MODULE_NAME[#]`` at its ``BUILT_MODULE_LOCATION[#]``.

Unlike dkms it runs everything in the sandbox (the source's Makefile is
untrusted code), keeps the full log compressed, keeps the built modules
unstripped (their DWARF is what lets two builds be diffed at type level) in a
content-addressed store, and turns the log into one classified reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zstandard

from kmodgate.abi.compare import Outcome
from kmodgate.build.dkms import DkmsConf, build_command, evaluate_dkms_conf
from kmodgate.build.kernel_tree import KernelTree
from kmodgate.build.logs import BuildError, classify_log
from kmodgate.build.sandbox import Limits, Mount, SandboxResult, run_sandboxed
from kmodgate.build.toolchain import Match, Toolchain, tool_versions
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import InfraError, KmodgateError, UserError
from kmodgate.results import CheckResult
from kmodgate.sources import debian
from kmodgate.sources.module_sources import ModuleSource

# Bump when anything here changes what a build produces or how it is judged:
# results cached under an older recipe are then rebuilt.
RECIPE_VERSION = 1

# The build sees a minimal, fixed environment: nothing of the caller's leaks
# into the result.  LC_ALL=C keeps gcc's diagnostics in the form logs.py reads.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "LANG": "C",
    "HOME": "/nonexistent",
    "TERM": "dumb",
}

# Reason codes that are the machine's fault, not the module's (outcome error).
INFRA_CODES = frozenset({"command_not_found"})


def cell_fingerprint(source: ModuleSource, kernel: KernelTree, toolchain: Toolchain) -> str:
    """Hash of every input that decides a cell's outcome.

    The evaluated dkms.conf is a function of the source tree (hashed), the
    kernel release and .config (in the kernel identity), so it needs no hash
    of its own and the fingerprint is known before anything runs.
    """
    data = {
        "recipe": RECIPE_VERSION,
        "source": source.tree_hash,
        "kernel": kernel.identity,
        "release": kernel.release,
        "compiler": toolchain.describe(),
        "tools": tool_versions(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def build_cell(
    source: ModuleSource,
    kernel: KernelTree,
    toolchain: Toolchain,
    *,
    make_jobs: int = 1,
    limits: Limits | None = None,
    fingerprint: str | None = None,
) -> CheckResult:
    """Build *source* against *kernel* in the sandbox; never raises for a broken module.

    A KmodgateError from the machinery (the sandbox cannot start, dkms.conf
    cannot be read) becomes an ``error`` result, so one bad cell never stops a
    matrix.
    """
    cell = prepare_cell(source, kernel, toolchain, limits=limits, fingerprint=fingerprint)
    return cell.compile(make_jobs)


class PreparedCell:
    """A cell up to the point where make runs: dkms.conf evaluated, the source
    copied to dkms's build directory, patches applied.

    The two halves are separate so a scheduler can prepare the next cells
    while others compile, and choose ``make -j`` only when a compile slot is
    free.  ``result`` is final already when preparing decided the outcome
    (skip, broken dkms.conf, failed patch, no compiler); ``compile`` then
    just returns it.  Either way ``compile`` must be called exactly once: it
    removes the work directory.
    """

    def __init__(self, result: CheckResult, source: ModuleSource, kernel: KernelTree,
                 toolchain: Toolchain, work: Path, limits: Limits) -> None:
        self.result = result
        self.source = source
        self.kernel = kernel
        self.toolchain = toolchain
        self.work = work
        self.limits = limits
        self.conf: DkmsConf | None = None
        self.log = bytearray()
        self.done = False  # the outcome is known without running make
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}

    def compile(self, make_jobs: int = 1) -> CheckResult:
        """Run make (unless the outcome is already known) and judge the build."""
        result = self.result
        begun = time.monotonic()
        try:
            if not self.done:
                result.details["make_jobs"] = make_jobs
                _compile(self, make_jobs)
        except KmodgateError as exc:
            result.outcome = Outcome.ERROR
            result.reasons = [_reason("infrastructure", str(exc))]
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
            self.phases["wait"] = begun - self.started - self.phases.get("prepare", 0.0)
            self.phases["compile"] = time.monotonic() - begun
            result.details["phases"] = {k: round(v, 3) for k, v in self.phases.items()}
            # The build's own time: a wait for a free core is the scheduler's.
            result.duration_seconds = round(self.phases.get("prepare", 0.0)
                                            + self.phases["compile"], 3)
        return result


def prepare_cell(
    source: ModuleSource,
    kernel: KernelTree,
    toolchain: Toolchain,
    *,
    limits: Limits | None = None,
    fingerprint: str | None = None,
) -> PreparedCell:
    """Everything of a build before make; never raises for a broken module."""
    fingerprint = fingerprint or cell_fingerprint(source, kernel, toolchain)
    result = CheckResult(
        module=source.name,
        module_version=source.commit or source.version,
        kernel=kernel.release,
        kind="build",
        outcome=Outcome.ERROR,
        fingerprint=fingerprint,
        reproducer=reproducer(source, kernel),
        toolchain=toolchain.describe(),
        details=_base_details(source, kernel, toolchain),
    )
    work = Path(tempfile.mkdtemp(prefix="cell-", dir=cache_subdir("build-work")))
    cell = PreparedCell(result, source, kernel, toolchain, work, limits or Limits())
    try:
        _prepare(cell)
    except UserError as exc:
        # Only the module's own dkms.conf raises these here (not bash, hostile,
        # no PACKAGE_NAME...): the module's packaging is broken, a result.
        result.outcome = Outcome.FAIL
        result.reasons = [_reason("dkms_conf_invalid", str(exc))]
        cell.done = True
    except KmodgateError as exc:
        result.outcome = Outcome.ERROR
        result.reasons = [_reason("infrastructure", str(exc))]
        cell.done = True
    cell.phases["prepare"] = time.monotonic() - cell.started
    return cell


def _prepare(cell: PreparedCell) -> None:
    result, source, kernel, work = cell.result, cell.source, cell.kernel, cell.work
    mounts = tuple(kernel.mounts)
    conf = evaluate_dkms_conf(
        source.tree,
        kernelver=kernel.release,
        arch=kernel.arch,
        kernel_source_dir=kernel.build_dir,
        kernel_config=kernel.config,
        workdir=work,
        mounts=mounts,
        # dkms's tree inside the writable work directory, at the same path
        # inside and out, so MAKE lines naming ${dkms_tree} find the build.
        dkms_tree=str(work / "dkms"),
    )
    cell.conf = conf
    result.details["dkms"] = {
        "package_name": conf.package_name,
        "package_version": conf.package_version,
        "make": conf.make_command,
        "modules": [asdict(m) for m in conf.modules],
        "patches": list(conf.patches),
    }
    result.details["manual_reproducer"] = _manual_reproducer(kernel, conf)
    cell.done = True  # until the build directory is ready
    if conf.skip_reason:
        result.outcome = Outcome.SKIP
        result.reasons = [_reason("build_exclusive", conf.skip_reason)]
        return
    toolchain = cell.toolchain
    if not toolchain.usable:
        result.outcome = Outcome.ERROR
        result.reasons = [_reason(
            "compiler_missing",
            f"the kernel was built with {toolchain.wanted!r}, which this machine does not "
            "have; install it or configure a substitute compiler",
            symbol=toolchain.wanted,
        )]
        return

    build_dir = Path(conf.build_dir)
    build_dir.parent.mkdir(parents=True)
    shutil.copytree(source.tree, build_dir, symlinks=True)
    # Patches run with make's environment, as under dkms; -j does not matter to patch.
    env = _build_env(toolchain, 1)
    for patch in conf.patches:
        outcome = _apply_patch(patch, build_dir, work, mounts, env, cell.limits, cell.log)
        if outcome is not None:
            result.outcome, result.reasons = Outcome.FAIL, [outcome]
            _finish_log(result, cell.log)
            return
    cell.done = False


def _compile(cell: PreparedCell, make_jobs: int) -> None:
    result, kernel, conf = cell.result, cell.kernel, cell.conf
    assert conf is not None
    build_dir = Path(conf.build_dir)
    env = _build_env(cell.toolchain, make_jobs)
    make_command = build_command(conf, kernelver=kernel.release, jobs=make_jobs)
    result.details["make_command"] = make_command
    # dkms runs PRE_BUILD, MAKE and POST_BUILD in the build directory, one
    # after the other, stopping at the first failure; CLEAN is skipped, the
    # copy is fresh.
    steps = [_build_script(conf.pre_build, build_dir), make_command,
             _build_script(conf.post_build, build_dir)]
    script = " && ".join(f"{{ {s}; }}" for s in steps if s)
    run = run_sandboxed(
        ["/bin/bash", "-c", script],
        workdir=cell.work, mounts=tuple(kernel.mounts), env=env, limits=cell.limits,
        cwd=str(build_dir),
    )
    cell.log += run.output
    result.details["sandbox"] = {
        "returncode": run.returncode,
        "wall_seconds": round(run.wall_seconds, 3),
        # CPU time (user + system) of everything the build sandbox ran: make
        # and what it starts (gcc, ld, modpost, pahole), from the kernel's
        # rusage of the reaped process tree.
        "cpu_seconds": round(run.cpu_seconds, 3),
        "limit_hit": run.limit_hit,
        "output_truncated": run.output_truncated,
    }
    _finish_log(result, cell.log)
    _judge(result, run, conf, build_dir, cell.source)


def _judge(result: CheckResult, run: SandboxResult, conf: DkmsConf, build_dir: Path,
           source: ModuleSource) -> None:
    if run.timed_out or run.limit_hit:
        result.outcome = Outcome.ERROR
        what = run.limit_hit or "wall time"
        result.reasons = [_reason("limit_exceeded",
                                  f"the build was stopped: it exceeded the {what} limit")]
        return
    text = run.output.decode("utf-8", "replace")
    error = classify_log(text, strip_prefixes=[str(build_dir)])
    if run.returncode == 0:
        missing = [m for m in conf.modules
                   if not (build_dir / m.location / f"{m.name}.ko").is_file()]
        if not missing:
            result.outcome = Outcome.PASS
            result.artifacts, result.details["modules"] = _store_modules(conf, build_dir)
            return
        names = ", ".join(f"{m.location.rstrip('/') + '/' if m.location else ''}{m.name}.ko"
                          for m in missing)
        result.outcome = Outcome.FAIL
        result.reasons = [_reason("module_not_built",
                                  f"make succeeded but did not produce {names}")]
        return
    related = error is not None and error.code in DEPENDENCY_CODES
    absent = absent_build_depends(source.build_depends) if related else []
    culprit = _missing_dependency(error, absent)
    if culprit is not None and error is not None:
        # Not the module's fault: its package declares what it needs to build
        # and this machine does not have it.
        result.outcome = Outcome.ERROR
        result.reasons = [
            _reason("build_dependency_missing",
                    f"{source.name} depends on {culprit}, which is not installed here and "
                    f"ships what the build lacks ({error.header or error.symbol or error.message})",
                    symbol=culprit),
            error.to_reason(),
        ]
        return
    if error is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
        result.outcome = Outcome.FAIL
        result.reasons = [_reason("build_failed",
                                  f"make exited with status {run.returncode}: {tail[0]}")]
        return
    result.outcome = Outcome.ERROR if error.code in INFRA_CODES else Outcome.FAIL
    result.reasons = [error.to_reason()]


def _apply_patch(patch: str, build_dir: Path, work: Path, mounts: tuple[Mount, ...],
                 env: Mapping[str, str], limits: Limits, log: bytearray) -> dict[str, Any] | None:
    """dkms applies PATCH[#] as ``patch -p1 < ./patches/<name>`` in the build directory."""
    if not (build_dir / "patches" / patch).is_file():
        return _reason("patch_missing", f"patch {patch} named in dkms.conf is not in patches/")
    run = run_sandboxed(
        ["/bin/sh", "-c", f"patch -p1 < ./patches/{shlex.quote(patch)}"],
        workdir=work, mounts=mounts, env=env, limits=limits, cwd=str(build_dir),
    )
    log += f"$ patch -p1 < ./patches/{patch}\n".encode() + run.output
    if run.returncode == 0:
        return None
    return _reason("patch_failed", f"patch {patch} does not apply", file=f"patches/{patch}")


def _build_script(script: str | None, build_dir: Path) -> str | None:
    """dkms's run_build_script: ``$build_dir/<PRE_BUILD>``, run only if executable."""
    if not script:
        return None
    path = build_dir / script.split(" ", 1)[0]
    if not os.access(path, os.X_OK):
        return None
    return f"{build_dir}/{script}"


def _build_env(toolchain: Toolchain, make_jobs: int) -> dict[str, str]:
    env = dict(BASE_ENV)
    # MAKEFLAGS reaches every make the command starts, including MAKE lines
    # that do not begin with "make" (which dkms's -j substitution misses).
    flags = [f"-j{make_jobs}"]
    if toolchain.command is None:
        raise InfraError("no compiler to build with")  # callers check usable first
    # dkms exports CC as the kernel's compiler; the kernel Makefile's own CC
    # assignment wins over the environment, so a compiler other than the one it
    # names (a substitute) must be forced as a command-line variable.
    env["CC"] = toolchain.command
    overrides = list(toolchain.make_vars)
    if toolchain.match is not Match.EXACT or toolchain.command != _wanted_command(toolchain):
        overrides.append(("CC", toolchain.command))
    if overrides:
        flags.append("--")
        flags.extend(f"{k}={v}" for k, v in overrides)
    env["MAKEFLAGS"] = " ".join(flags)
    return env


def _wanted_command(toolchain: Toolchain) -> str | None:
    return toolchain.wanted.split(" ", 1)[0] if toolchain.wanted else None


def _finish_log(result: CheckResult, log: bytearray) -> None:
    """The full log, zstd-compressed, named by the cell's fingerprint."""
    path = cache_subdir("build-logs") / f"{result.fingerprint}.log.zst"
    atomic_write_bytes(path, zstandard.ZstdCompressor(level=10).compress(bytes(log)))
    result.log_path = str(path)


def _store_modules(conf: DkmsConf, build_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Copy the built .ko files into the content-addressed store."""
    store = cache_subdir("build-artifacts")
    paths: list[str] = []
    info: list[dict[str, str]] = []
    for m in conf.modules:
        data = (build_dir / m.location / f"{m.name}.ko").read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        target = store / digest[:2] / f"{digest}.ko"
        if not target.exists():
            atomic_write_bytes(target, data)
        paths.append(str(target))
        info.append({"name": m.name, "dest_name": m.dest_name, "sha256": digest,
                     "path": str(target)})
    return paths, info


_INSTALLED_RE = re.compile(r"^install ok installed$")

# Failures an absent build dependency can cause.  Any other compile error is
# the module's own, whatever else is absent (openrazer's Depends name udev,
# which no build needs).
DEPENDENCY_CODES = frozenset(
    {"missing_header", "command_not_found", "modpost_undefined", "link_undefined", "make_error"}
)


def _missing_dependency(error: BuildError | None, absent: list[str]) -> str | None:
    """The absent dependency that ships what the failed build lacked, if any.

    Decided by the dependency's own file list: a missing header it ships, a
    command it installs, a path make could not find.  A -dkms dependency
    provides modules, so an undefined symbol at modpost points at it.
    """
    if error is None or error.code not in DEPENDENCY_CODES:
        return None
    for package in absent:
        if error.code in ("modpost_undefined", "link_undefined"):
            if package.endswith("-dkms"):
                return package
            continue
        files = package_files(package)
        if error.code == "missing_header" and error.header:
            if any(f.endswith("/" + error.header) for f in files):
                return package
        elif error.code == "command_not_found" and error.symbol:
            if any(f.endswith("/bin/" + error.symbol) for f in files):
                return package
        elif any(f in error.message or f == error.file for f in files if f.count("/") > 2):
            return package
    return None


def package_files(package: str) -> list[str]:
    """The absolute paths a Debian package ships, read from its .deb; empty if
    apt does not know it (a virtual package, say)."""
    try:
        deb = debian.download(package)
    except KmodgateError:
        return []
    proc = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                          check=False)
    files = []
    for line in proc.stdout.splitlines():
        name = line.split(" -> ", 1)[0].split()[-1] if line.strip() else ""
        if name.startswith("./") and not name.endswith("/"):
            files.append(name[1:])
    return files


def absent_build_depends(depends: tuple[str, ...]) -> list[str]:
    """The package's declared Depends that are not installed on this machine."""
    absent = []
    for name in depends:
        try:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", name],
                capture_output=True, text=True, check=False,
            )
        except FileNotFoundError:
            raise InfraError("dpkg-query is not installed; it is needed to check the "
                             "build dependencies of Debian packages") from None
        if not _INSTALLED_RE.match(proc.stdout.strip()):
            absent.append(name)
    return absent


def relabel(result: CheckResult, source: ModuleSource, kernel: KernelTree) -> CheckResult:
    """A cached result as the answer for this request.

    The fingerprint covers what decides the outcome (tree content, kernel
    content, toolchain), not what the request calls them: two commits with
    the same tree, or one kernel named two ways, share a cached build, and
    each result must still name the commit and references that were asked for.
    """
    result.module_version = source.commit or source.version
    result.reproducer = reproducer(source, kernel)
    result.details.update(source=source.ref, source_version=source.version,
                          commit=source.commit, kernel_ref=kernel.ref)
    return result


def reproducer(source: ModuleSource, kernel: KernelTree) -> str:
    return (f"kmodgate check --kind build --kernel {shlex.quote(kernel.ref)} "
            f"--module {shlex.quote(source.ref)}")


def _base_details(source: ModuleSource, kernel: KernelTree,
                  toolchain: Toolchain) -> dict[str, Any]:
    return {
        "source": source.ref,
        "source_version": source.version,
        "commit": source.commit,
        "tree_hash": source.tree_hash,
        "kernel_ref": kernel.ref,
        "kernel_identity": kernel.identity,
        "kernel_source_dir": kernel.build_dir,
        "toolchain": {
            "wanted": toolchain.wanted,
            "command": toolchain.command,
            "version": toolchain.version_text,
            "match": toolchain.match.value,
            **tool_versions(),
        },
        "make_jobs": None,  # set when make runs
    }


def _manual_reproducer(kernel: KernelTree, conf: DkmsConf) -> str:
    """The same build with dkms itself, once the kernel's headers are installed."""
    build = (f"dkms build -m {shlex.quote(conf.package_name)} "
             f"-v {shlex.quote(conf.package_version)} -k {shlex.quote(kernel.release)}")
    if kernel.ref.startswith("debian:"):
        return f"apt-get install linux-headers-{kernel.release} && {build}"
    return f"{build} --kernelsourcedir {shlex.quote(kernel.source_dir)}"


def _reason(code: str, message: str, *, symbol: str | None = None, file: str | None = None,
            line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "symbol": symbol, "file": file, "line": line}


def read_log(path: str | os.PathLike[str]) -> str:
    """A cell's full log, decompressed."""
    with open(path, "rb") as f:
        return zstandard.ZstdDecompressor().decompressobj().decompress(f.read()).decode(
            "utf-8", "replace")


__all__ = ["RECIPE_VERSION", "BuildError", "PreparedCell", "build_cell", "cell_fingerprint",
           "prepare_cell", "read_log"]
