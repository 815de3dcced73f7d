"""Run third-party build code (Makefiles, dkms.conf) where it cannot hurt the host.

Module sources are somebody else's code, and ``make`` runs whatever their
Makefile says.  Every build and every dkms.conf evaluation therefore runs
under bubblewrap with:

* no network at all: a fresh network namespace, so not even the host's
  loopback services are reachable;
* a read-only view of the host (``--ro-bind / /``) with ``/tmp``, ``/var/tmp``,
  ``/run``, ``/root``, ``/home`` and the caller's ``$HOME`` replaced by empty
  tmpfs, and only *workdir* (plus explicitly writable mounts) writable;
* an unprivileged uid: when kmodgate runs as root the command is switched to a
  dedicated uid with no capabilities and ``no_new_privs`` (``setpriv``), so
  root-only files stay unreadable and ``RLIMIT_NPROC`` -- which the kernel
  does not enforce for root -- really stops a fork bomb;
* rlimits per process (address space, CPU, file size, processes) set with
  ``prlimit``, plus totals over the whole process tree polled from ``/proc``
  (CPU time, resident memory, process count) and a cap on the output;
* its own PID namespace: killing bubblewrap's init tears the namespace down,
  so a timeout kills every descendant, daemons included.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodgate.cache import cache_subdir
from kmodgate.errors import InfraError

# Host uids the sandboxed commands run as when kmodgate itself runs as root:
# one per concurrent sandbox, so RLIMIT_NPROC (counted per uid) of one build
# never starves another.  65000-65533 is reserved by Debian policy and never
# handed out to packages or people.
SANDBOX_UID_BASE = 65000
SANDBOX_UID_SLOTS = 256

# Environment every sandboxed command starts from; the caller's env is laid
# over it.  LC_ALL=C keeps compiler diagnostics in the form log parsing expects.
# HOME points nowhere, like Debian's "nobody": a Makefile writing to $HOME fails.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/nonexistent",
    "LC_ALL": "C",
    "LANG": "C",
    "TMPDIR": "/tmp",
    "SHELL": "/bin/sh",
}

# Host directories replaced by an empty tmpfs inside: private scratch space
# (/tmp, /var/tmp), places holding other people's secrets or sockets, and the
# host's own kernel trees -- a build must see the kernel build it is checked
# against (mounted by the caller), never whatever headers the host has.
HIDDEN_DIRS = ("/run", "/root", "/home", "/usr/src", "/lib/modules")
SCRATCH_DIRS = ("/tmp", "/var/tmp")

# How often the process tree is measured.  A fork bomb reaches its cap within
# milliseconds, so this only bounds how long it runs at the cap.
POLL_SECONDS = 0.2
READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 600.0
    cpu_seconds: int = 1800
    memory_bytes: int = 4 << 30
    processes: int = 512
    output_bytes: int = 64 << 20
    # Largest single file a sandboxed process may write (RLIMIT_FSIZE): a
    # runaway build fills at most this much per file, not the disk.
    file_bytes: int = 1 << 30


@dataclass(frozen=True)
class Mount:
    source: Path  # host path
    target: str  # absolute path inside the sandbox
    writable: bool = False


@dataclass
class SandboxResult:
    returncode: int | None  # None when kmodgate killed the command (timeout, limit)
    output: bytes  # stdout+stderr interleaved, cut at limits.output_bytes
    output_truncated: bool
    timed_out: bool
    limit_hit: str | None  # "wall time", "cpu time", "memory", "processes", "output" or None
    wall_seconds: float
    cpu_seconds: float
    command: list[str] = field(default_factory=list)  # the full bwrap command line, for reproducers

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.limit_hit is None


def run_sandboxed(
    argv: Sequence[str],
    *,
    workdir: Path,
    mounts: Sequence[Mount] = (),
    env: Mapping[str, str] | None = None,
    limits: Limits = Limits(),
    cwd: str | None = None,
    extra_fd_file: Path | None = None,
) -> SandboxResult:
    """Run *argv* in the sandbox and return what happened; never raises for the
    command's own failure.  *workdir* is bound read-write at its own absolute
    path and is the default working directory.  With *extra_fd_file*, that host
    file is truncated and handed to the command as an open writable descriptor
    whose number is in ``$KMODGATE_RESULT_FD``: a result channel the command's
    output cannot corrupt."""
    if not argv:
        raise ValueError("run_sandboxed needs a command")
    bwrap = _tool("bwrap", "bubblewrap")
    prlimit = _tool("prlimit", "util-linux")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for m in mounts:
        if not m.target.startswith("/"):
            raise ValueError(f"mount target must be absolute: {m.target}")
        if not m.source.exists():
            raise InfraError(f"cannot mount {m.source} into the sandbox: it does not exist")

    with contextlib.ExitStack() as stack:
        uid: int | None = None
        if os.geteuid() == 0:
            uid = stack.enter_context(_uid_slot())
            setpriv = _tool("setpriv", "util-linux")
            _give_to(workdir, uid)
            for m in mounts:
                if m.writable:
                    _give_to(m.source, uid)

        info_r, info_w = os.pipe()
        stack.callback(_close_quietly, info_r)
        pass_fds = [info_w]
        full_env = dict(BASE_ENV)
        if env:
            full_env.update(env)
        if extra_fd_file is not None:
            extra_fd = os.open(extra_fd_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(_close_quietly, extra_fd)
            pass_fds.append(extra_fd)
            full_env["KMODGATE_RESULT_FD"] = str(extra_fd)

        cmd = [bwrap, *_namespace_args(root=uid is not None), "--info-fd", str(info_w)]
        cmd += _filesystem_args(workdir, mounts, uid)
        cmd += ["--chdir", cwd or str(workdir), "--", prlimit, *_rlimit_args(limits), "--"]
        if uid is not None:
            cmd += [
                setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            ]
        cmd += list(argv)
        return _supervise(cmd, full_env, pass_fds, info_r, info_w, limits)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InfraError(f"{name} is not installed; install the Debian package {package} "
                         "to sandbox module builds")
    return path


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def _uid_slot() -> Iterator[int]:
    """A host uid no other running sandbox uses, held by an flock."""
    slots = cache_subdir("sandbox-uids")
    for slot in range(SANDBOX_UID_SLOTS):
        fd = os.open(slots / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield SANDBOX_UID_BASE + slot
        finally:
            os.close(fd)
        return
    raise InfraError(f"all {SANDBOX_UID_SLOTS} sandbox uids are in use")


def _give_to(path: Path, uid: int) -> None:
    """Make *path* and everything below it owned by the sandbox uid, without
    following symlinks a previous build may have planted."""
    os.lchown(path, uid, uid)
    if not path.is_dir() or path.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), uid, uid)


def _namespace_args(*, root: bool) -> list[str]:
    # As root, bwrap creates the namespaces with its privileges and setpriv
    # then drops to the sandbox uid; a user namespace would map that uid back
    # to root outside, so none is created.  Unprivileged, bwrap needs one.
    common = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
              "--unshare-cgroup-try", "--hostname", "kmodgate-sandbox",
              "--die-with-parent", "--new-session"]
    return common if root else ["--unshare-user", *common]


def _filesystem_args(workdir: Path, mounts: Sequence[Mount], uid: int | None) -> list[str]:
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    hidden: list[str] = []
    for d in SCRATCH_DIRS:
        args += ["--perms", "1777", "--tmpfs", d]
        hidden.append(d)
    home = os.environ.get("HOME", "")
    for d in (*HIDDEN_DIRS, home):
        if d and d != "/" and os.path.isdir(d) and not _under_any(d, hidden):
            args += ["--tmpfs", d]
            hidden.append(d)
    binds: list[tuple[str, str, bool]] = [(str(workdir), str(workdir), True)]
    binds += [(str(m.source.resolve()), m.target, m.writable) for m in mounts]
    for _, target, _ in sorted(binds, key=lambda b: b[1]):
        if _under_any(target, hidden):
            continue  # bwrap creates the mount point inside the tmpfs
        blocker = _first_untraversable(target, uid) if uid is not None else None
        if blocker:
            # The sandbox uid walks the host's directory tree: a bind target
            # below a directory it may not enter (a 0700 temporary directory)
            # would be unreachable, so that directory becomes a tmpfs in which
            # bwrap creates the path to the mount point.  Nothing readable is
            # lost: the sandbox uid could not look inside anyway.
            args += ["--tmpfs", blocker]
            hidden.append(blocker)
        elif not os.path.lexists(target):
            # The read-only root has no room for a new mount point (headers
            # placed at /usr/src/linux-headers-<release>, say): the deepest
            # existing ancestor becomes a tmpfs holding its own entries again.
            parent = _deepest_existing(target)
            args += _recreate_as_tmpfs(parent)
            hidden.append(parent)
    # bwrap creates a mount point's missing parents inside a tmpfs with the
    # modes of the host directories; a 0700 parent would lock the sandbox uid
    # out, so each such parent is created explicitly, searchable.
    made: set[str] = set()
    for _, target, _ in binds:
        parts = Path(target).parts
        for i in range(2, len(parts)):
            ancestor = os.path.join(*parts[:i])
            if ancestor not in made and _under_any(ancestor, hidden) and ancestor not in hidden:
                args += ["--perms", "0755", "--dir", ancestor]
                made.add(ancestor)
    # Parents before children, so a mount inside another mount stays visible.
    for source, target, writable in sorted(binds, key=lambda b: b[1].count("/")):
        args += ["--bind" if writable else "--ro-bind", source, target]
    return args


def _deepest_existing(path: str) -> str:
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if parent == "/":
        raise ValueError(f"cannot mount at {path}: its top-level directory does not exist")
    return parent


def _recreate_as_tmpfs(directory: str) -> list[str]:
    """bwrap arguments replacing *directory* by a tmpfs with the same entries,
    each bound read-only (symlinks recreated)."""
    args = ["--tmpfs", directory]
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry.path), entry.path]
        else:
            args += ["--ro-bind", entry.path, entry.path]
    return args


def _under_any(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _first_untraversable(target: str, uid: int) -> str | None:
    """The outermost proper ancestor of *target* that *uid* cannot search."""
    parts = Path(target).parts
    for i in range(2, len(parts)):
        ancestor = os.path.join(*parts[:i])
        try:
            st = os.stat(ancestor)
        except OSError:
            return None  # bwrap creates missing directories itself
        if not stat.S_ISDIR(st.st_mode):
            return None
        allowed = (st.st_mode & stat.S_IXUSR) if st.st_uid == uid else (st.st_mode & stat.S_IXOTH)
        if not allowed:
            return ancestor
    return None


def _rlimit_args(limits: Limits) -> list[str]:
    # Per process: RLIMIT_AS stops one runaway allocation; RLIMIT_CPU, a second
    # above the total, is a backstop should polling miss a single spinning
    # process.  Totals over the tree are enforced by polling.
    cpu = max(1, int(limits.cpu_seconds)) + 1
    return [
        f"--nproc={limits.processes}",
        f"--as={limits.memory_bytes}",
        f"--cpu={cpu}:{cpu + 5}",
        f"--fsize={limits.file_bytes}",
        "--core=0",
    ]


@dataclass
class _TreeUsage:
    processes: int = 0
    cpu_seconds: float = 0.0
    rss_bytes: int = 0


def _measure_tree(ns_link: str) -> _TreeUsage:
    """Processes in the sandbox's PID namespace, their CPU time (including
    reaped children's) and resident memory."""
    usage = _TreeUsage()
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/pid") != ns_link:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # Fields after "comm)": state is [0]; utime..cstime are [11..14]; rss [21].
        usage.processes += 1
        usage.cpu_seconds += sum(int(x) for x in fields[11:15]) / tick
        usage.rss_bytes += int(fields[21]) * page
    return usage


PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def _subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+).

    bubblewrap's monitor process takes the command's exit status from its
    namespace's init through an eventfd and exits without waiting for that
    init, so the init -- which reaped the whole build and holds its CPU time
    -- is orphaned and its rusage never reaches us: the monitor's rusage is a
    few milliseconds whatever the build used.  As a subreaper, this process
    inherits the orphaned init and reaps it itself (``_reap_init``).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _reap_init(pid: int) -> float:
    """CPU seconds of the sandbox's init and everything it reaped, once it is ours."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            done, _, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return 0.0  # not reparented to us (bwrap reaped it, or no subreaper)
        if done:
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            # --die-with-parent kills it when the monitor exits; this is a backstop.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)


def _supervise(cmd: list[str], env: dict[str, str], pass_fds: list[int], info_r: int,
               info_w: int, limits: Limits) -> SandboxResult:
    _subreaper()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, pass_fds=pass_fds, start_new_session=True,
        )
    except OSError as e:
        raise InfraError(f"cannot start bubblewrap: {e.strerror}") from None
    finally:
        os.close(info_w)
    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()
    os.set_blocking(out_fd, False)
    os.set_blocking(info_r, False)
    sel = selectors.DefaultSelector()
    sel.register(out_fd, selectors.EVENT_READ, "out")
    sel.register(info_r, selectors.EVENT_READ, "info")

    chunks: list[bytes] = []
    kept = 0
    truncated = False
    limit_hit: str | None = None
    info = b""
    child_pid: int | None = None
    ns_link: str | None = None
    peak_cpu = 0.0
    next_poll = start
    killed_at: float | None = None

    def kill() -> None:
        nonlocal killed_at
        killed_at = time.monotonic()
        # The namespace's init first: its death kills everything inside.
        for pid in (child_pid, proc.pid):
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    open_fds = {out_fd, info_r}
    while out_fd in open_fds:
        now = time.monotonic()
        if limit_hit is None and now - start > limits.wall_seconds:
            limit_hit = "wall time"
            kill()
        if limit_hit is None and ns_link is not None and now >= next_poll:
            next_poll = now + POLL_SECONDS
            usage = _measure_tree(ns_link)
            peak_cpu = max(peak_cpu, usage.cpu_seconds)
            # RLIMIT_NPROC makes fork() fail at the cap; a tree sitting at the
            # cap is a fork bomb that would otherwise retry until the wall limit.
            if usage.processes >= limits.processes:
                limit_hit = "processes"
            elif usage.cpu_seconds >= limits.cpu_seconds:
                limit_hit = "cpu time"
            elif usage.rss_bytes > limits.memory_bytes:
                limit_hit = "memory"
            if limit_hit:
                kill()
        for key, _ in sel.select(timeout=POLL_SECONDS):
            fd = key.fd
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(fd)
                open_fds.discard(fd)
                continue
            if key.data == "info":
                info += data
                if child_pid is None:
                    child_pid, ns_link = _parse_info(info)
                continue
            room = limits.output_bytes - kept
            if len(data) > room:
                truncated = True
                data = data[:room]
                if limit_hit is None:
                    limit_hit = "output"
                    kill()
            if data:
                chunks.append(data)
                kept += len(data)
        if killed_at is not None and now - killed_at > 10 and proc.poll() is not None:
            break  # something outside the namespace still holds the pipe open
    sel.close()
    proc.stdout.close()

    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    cpu = rusage.ru_utime + rusage.ru_stime
    if child_pid is not None:
        cpu += _reap_init(child_pid)
    cpu = max(peak_cpu, cpu)
    output = b"".join(chunks)
    # bwrap reports the sandbox's pid once its namespaces exist; without it,
    # bwrap itself failed (no user namespaces...).  The child then sets up the
    # mounts and can still fail before running anything: bwrap says so on the
    # first line, prefixed "bwrap: ", and exits 1.  Either is kmodgate's
    # failure, never the module's.  (A module printing the prefix itself only
    # turns its own failure into an error, which blocks a gate all the same.)
    setup_failed = proc.returncode == 1 and output.startswith(b"bwrap: ")
    if (child_pid is None or setup_failed) and limit_hit is None:
        lines = output.decode("utf-8", "replace").strip().splitlines()
        raise InfraError("bubblewrap could not set up the sandbox: "
                         + (lines[-1] if lines else f"exit status {proc.returncode}"))
    if limit_hit is None and cpu >= limits.cpu_seconds:
        limit_hit = "cpu time"  # a process died of RLIMIT_CPU
    return SandboxResult(
        returncode=None if killed_at is not None else proc.returncode,
        output=output,
        output_truncated=truncated,
        timed_out=limit_hit == "wall time",
        limit_hit=limit_hit,
        wall_seconds=wall,
        cpu_seconds=cpu,
        command=cmd,
    )


def _parse_info(info: bytes) -> tuple[int | None, str | None]:
    try:
        pid = int(json.loads(info.decode())["child-pid"])
    except (ValueError, KeyError, UnicodeDecodeError):
        return None, None  # not complete yet
    try:
        return pid, os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return pid, None  # already gone: nothing left to measure
