"""dkms.conf semantics, as dkms 3.x implements them.

A dkms.conf is a bash fragment, not a key=value file: it branches on the
kernel's .config, runs ``sed`` and ``find``, and builds arrays in loops.  The
only faithful reading is dkms's own: source it with bash, with the variables
dkms sets (``kernelver``, ``arch``, ``kernel_source_dir``, ``dkms_tree``...),
and read back the variables dkms accepts.  Because it is third-party code,
that happens inside the sandbox, and the values come back through a separate
descriptor that nothing the file prints can corrupt.

What dkms does with the values afterwards (read_conf and prepare_build in
/usr/sbin/dkms, 3.0.10, cross-checked with 3.1's BUILD_EXCLUSIVE_KERNEL_MIN/
_MAX handling) is mirrored here:

* ``MAKE[0]`` is the make command unless ``MAKE_MATCH[0]`` is set; then every
  ``MAKE[i]`` whose ``MAKE_MATCH[i]`` (a bash regex) matches ``kernelver``
  overrides it, the last match winning; with none, the default is
  ``make -C $kernel_source_dir M=$dkms_tree/$module/$module_version/build``;
* ``CC=clang`` / ``LD=ld.lld`` are appended for clang/LLD-built kernels;
* ``PATCH[i]`` applies when ``PATCH_MATCH[i]`` is empty or matches;
* module records run over the largest *count* of the four module arrays;
  a record without a name borrows ``PACKAGE_NAME`` when exactly one
  ``DEST_MODULE_LOCATION`` is given; ``DEST_MODULE_NAME`` defaults to the name;
* ``BUILD_EXCLUSIVE_KERNEL``/``_ARCH`` are bash regexes, ``_KERNEL_MIN``/``_MAX``
  compare versions padded by dkms's VER(), ``_CONFIG`` lists options that must
  be ``y``/``m`` (or, prefixed by ``!``, must not be); a mismatch means the
  module does not apply to that kernel (a ``skip``, not a failure).

Regular expressions are matched by bash itself, inside the sandbox, so their
dialect is exactly dkms's.  ``DEST_MODULE_LOCATION`` only matters when
installing; kmodgate never installs, so it is not validated.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodgate.build.sandbox import Limits, Mount, SandboxResult, run_sandboxed
from kmodgate.errors import UserError

# Variables dkms accepts from dkms.conf (dkms_conf_variables in dkms 3.0.10),
# plus the two version bounds newer dkms added.  Cleared before sourcing, read
# back after.
DKMS_CONF_VARIABLES = (
    "CLEAN", "PACKAGE_NAME", "PACKAGE_VERSION", "POST_ADD", "POST_BUILD", "POST_INSTALL",
    "POST_REMOVE", "PRE_BUILD", "PRE_INSTALL", "BUILD_DEPENDS", "BUILD_EXCLUSIVE_KERNEL",
    "BUILD_EXCLUSIVE_KERNEL_MIN", "BUILD_EXCLUSIVE_KERNEL_MAX", "BUILD_EXCLUSIVE_ARCH",
    "BUILD_EXCLUSIVE_CONFIG", "build_exclude", "OBSOLETE_BY", "MAKE", "MAKE_MATCH", "PATCH",
    "PATCH_MATCH", "patch_array", "BUILT_MODULE_NAME", "built_module_name",
    "BUILT_MODULE_LOCATION", "built_module_location", "DEST_MODULE_NAME", "dest_module_name",
    "DEST_MODULE_LOCATION", "dest_module_location", "STRIP", "strip", "AUTOINSTALL",
    "NO_WEAK_MODULES", "SIGN_FILE", "MOK_SIGNING_KEY", "MOK_CERTIFICATE", "REMAKE_INITRD",
    "MODULES_CONF", "MODULES_CONF_OBSOLETES", "MODULES_CONF_ALIAS_TYPE",
    "MODULES_CONF_OBSOLETE_ONLY",
)

# Where dkms keeps its trees (dkms's own defaults; framework.conf can move
# them, kmodgate does not).  A build directory is $dkms_tree/$module/$version/build.
DKMS_TREE = "/var/lib/dkms"
SOURCE_TREE = "/usr/src"
INSTALL_TREE = "/lib/modules"

# A dkms.conf evaluation is a few shell commands: a minute and a little memory
# are plenty, and anything beyond is a hostile or broken file.
DKMS_CONF_LIMITS = Limits(wall_seconds=60.0, cpu_seconds=60, memory_bytes=1 << 30,
                          processes=64, output_bytes=1 << 20)
RESULT_BYTES_MAX = 16 << 20

# The evaluator, run by bash inside the sandbox.  Positional parameters:
# conf kernelver arch kernel_source_dir dkms_tree source_tree install_tree
# module module_version.  Results go to fd 3 as NUL-terminated fields; the
# conf's own stdout goes to stderr (dkms sends it to /dev/null; the log keeps
# it for diagnosing).
_EVALUATOR = r"""
shopt -s extglob
__conf=$1 kernelver=$2 arch=$3 kernel_source_dir=$4 dkms_tree=$5 source_tree=$6
install_tree=$7 module=$8 module_version=$9
tmp_location=/tmp
kernel_config="$kernel_source_dir/.config"
__vars="%(vars)s"
exec 3>&"$KMODGATE_RESULT_FD" || exit 90
unset KMODGATE_RESULT_FD
__out() { builtin printf '%%s\0' "$@" >&3; }

if ! __msg=$(bash -n "$__conf" 2>&1); then
    __out syntax "$__msg"
    exit 0
fi

# Like dkms's safe_source: clear the accepted variables, then source the file
# with the variable names as positional parameters, as dkms does.
__read() {
    local __v
    for __v in $__vars; do unset "$__v"; done
    . "$__conf" >&2
}

# dkms learns module and version from the file itself when given a source
# tree (add_source_tree -> get_pkginfo_from_conf), then reads it again.
if [[ -z $module ]]; then
    __pkg=$(__read $__vars; builtin printf '%%s\n%%s\n' "$PACKAGE_NAME" "$PACKAGE_VERSION")
    module=${__pkg%%%%$'\n'*}
    module_version=${__pkg#*$'\n'}
fi
__out module "$module" "$module_version"

__read $__vars

# No command substitution per variable: each would fork a subshell, and
# forty-odd forks were most of an evaluation's cost.  ${!name@a} is the
# variable's attributes (bash 4.4+), "a"/"A" for the two kinds of array.
for __n in $__vars; do
    eval "__idx=(\"\${!$__n[@]}\")"
    ((${#__idx[@]})) || continue
    case ${!__n@a} in
        *A*) __kind=A ;;
        *a*) __kind=a ;;
        *) __kind=s ;;
    esac
    for __i in "${__idx[@]}"; do
        eval "__val=\${$__n[\$__i]}"
        __out var "$__n" "$__kind" "$__i" "$__val"
    done
done

# read_conf's make command choice, regexes matched by bash as dkms does.
__make=
[[ ${MAKE_MATCH[0]} ]] || __make=${MAKE[0]}
for ((__i = 0; __i < ${#MAKE[@]}; __i++)); do
    [[ ${MAKE[$__i]} && ${MAKE_MATCH[$__i]} && $kernelver =~ ${MAKE_MATCH[$__i]} ]] &&
        __make=${MAKE[$__i]}
done
__out make "$__make"
for ((__i = 0; __i < ${#PATCH[@]}; __i++)); do
    if [[ ${PATCH[$__i]} && (! ${PATCH_MATCH[$__i]} || $kernelver =~ ${PATCH_MATCH[$__i]}) ]]
    then
        __out patch "${PATCH[$__i]}"
    fi
done
[[ $BUILD_EXCLUSIVE_KERNEL && ! $kernelver =~ $BUILD_EXCLUSIVE_KERNEL ]] && __out exclude kernel
[[ $BUILD_EXCLUSIVE_ARCH && ! $arch =~ $BUILD_EXCLUSIVE_ARCH ]] && __out exclude arch
__out end
"""


@dataclass(frozen=True)
class BuiltModule:
    name: str  # BUILT_MODULE_NAME[i]
    location: str  # BUILT_MODULE_LOCATION[i] without trailing "/" ("" = top of the build dir)
    dest_name: str  # DEST_MODULE_NAME[i] or name


@dataclass(frozen=True)
class DkmsConf:
    package_name: str
    package_version: str
    make_command: str  # the MAKE[#] chosen for this kernel via MAKE_MATCH, or dkms's default
    clean_command: str | None  # CLEAN, or dkms's default clean (dkms always cleans)
    modules: tuple[BuiltModule, ...]
    patches: tuple[str, ...]  # PATCH[#] applying to this kernel (PATCH_MATCH), in order
    skip_reason: str | None  # a BUILD_EXCLUSIVE_* mismatch, said plainly; None if it applies
    variables: dict[str, str]  # every evaluated dkms variable, "NAME" or "NAME[i]"
    # Where dkms would build, inside the sandbox: the make command's M= and
    # the working directory of MAKE, CLEAN and PRE_BUILD.
    build_dir: str = ""
    module: str = ""  # dkms's $module ($PACKAGE_NAME unless given)
    module_version: str = ""  # dkms's $module_version
    pre_build: str | None = None  # PRE_BUILD: run as $build_dir/<value> if executable
    post_build: str | None = None  # POST_BUILD, likewise after make
    arrays: dict[str, dict[int, str]] = field(default_factory=dict, repr=False)


def evaluate_dkms_conf(
    source_dir: Path,
    *,
    kernelver: str,
    arch: str,
    kernel_source_dir: str,
    kernel_config: Mapping[str, str],
    workdir: Path,
    mounts: Sequence[Mount] = (),
    limits: Limits = DKMS_CONF_LIMITS,
    dkms_tree: str = DKMS_TREE,
    module: str | None = None,
    module_version: str | None = None,
) -> DkmsConf:
    """Evaluate *source_dir*/dkms.conf for one kernel, as dkms would.

    *arch* is dkms's ``$arch`` (``uname -m``: "x86_64", not "amd64").
    *kernel_source_dir* is the kernel tree's path inside the sandbox; *mounts*
    must put it there (files like v4l2loopback's source its .config).
    *kernel_config* is the kernel's parsed .config; empty means "no .config",
    which, as in dkms, disables the BUILD_EXCLUSIVE_CONFIG check.
    Raises UserError naming the file when it is not valid, misbehaves or
    lacks what dkms requires.
    """
    source_dir = source_dir.resolve()
    conf_path = source_dir / "dkms.conf"
    if not conf_path.is_file():
        raise UserError("no dkms.conf in this directory", where=source_dir)
    if os.geteuid() == 0 and not _world_readable(source_dir, conf_path):
        # The file is sourced by the sandbox's unprivileged uid, not by root.
        raise UserError("the source tree is not world-readable, so the unprivileged sandbox "
                        "cannot read it (chmod -R a+rX)", where=conf_path)
    script = _EVALUATOR % {"vars": " ".join(DKMS_CONF_VARIABLES)}
    argv = ["bash", "--noprofile", "--norc", "-c", script, "kmodgate-dkms-conf",
            str(conf_path), kernelver, arch, kernel_source_dir, dkms_tree, SOURCE_TREE,
            INSTALL_TREE, module or "", module_version or ""]
    # The result file lives outside anything the sandbox can see; the command
    # writes it only through the inherited descriptor.
    with tempfile.TemporaryDirectory(prefix="kmodgate-dkms-") as tmp:
        result_file = Path(tmp) / "result"
        result = run_sandboxed(
            argv, workdir=workdir, mounts=[*mounts, Mount(source_dir, str(source_dir))],
            limits=limits, cwd=str(source_dir), extra_fd_file=result_file,
        )
        with open(result_file, "rb") as f:
            raw = f.read(RESULT_BYTES_MAX + 1)
    records = _parse_records(raw, result, conf_path)
    return _interpret(records, conf_path, kernelver=kernelver, arch=arch,
                      kernel_source_dir=kernel_source_dir, kernel_config=kernel_config,
                      dkms_tree=dkms_tree)


def _world_readable(directory: Path, conf_path: Path) -> bool:
    return bool(directory.stat().st_mode & stat.S_IXOTH and directory.stat().st_mode & stat.S_IROTH
                and conf_path.stat().st_mode & stat.S_IROTH)


@dataclass
class _Records:
    module: str = ""
    module_version: str = ""
    variables: dict[str, tuple[str, dict[int, str]]] = field(default_factory=dict)
    make: str = ""
    patches: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)


def _last_line(output: bytes) -> str:
    lines = [ln.strip() for ln in output.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _parse_records(raw: bytes, result: SandboxResult, conf_path: Path) -> _Records:
    if result.limit_hit:
        raise UserError(f"evaluating it hit the sandbox's {result.limit_hit} limit "
                        f"(last output: {_last_line(result.output)[:200]})", where=conf_path)
    if len(raw) > RESULT_BYTES_MAX:
        raise UserError("evaluating it produced more than "
                        f"{RESULT_BYTES_MAX >> 20} MiB of variables", where=conf_path)
    fields = raw.decode("utf-8", "surrogateescape").split("\0")
    recs = _Records()
    pos = 0

    def take(n: int) -> list[str]:
        nonlocal pos
        if pos + n > len(fields) - 1:  # the text after the last NUL is not a field
            raise UserError("its evaluation was cut short "
                            f"({_last_line(result.output)[:200]})", where=conf_path)
        out = fields[pos:pos + n]
        pos += n
        return out

    while True:
        if pos >= len(fields) - 1:
            status = result.returncode
            raise UserError(f"sourcing it ended the shell (exit status {status}): "
                            f"{_last_line(result.output)[:200]}", where=conf_path)
        (tag,) = take(1)
        if tag == "end":
            return recs
        if tag == "syntax":
            (msg,) = take(1)
            # bash says "FILE: line N: syntax error near ..." then echoes the line.
            first = (msg.strip().splitlines() or ["syntax error"])[0]
            first = first.removeprefix(f"{conf_path}: ")
            raise UserError(f"not valid bash: {first[:200]}", where=conf_path)
        if tag == "module":
            recs.module, recs.module_version = take(2)
        elif tag == "var":
            name, kind, index, value = take(4)
            entry = recs.variables.setdefault(name, (kind, {}))
            if kind != "A" and index.isdigit():
                entry[1][int(index)] = value
        elif tag == "make":
            (recs.make,) = take(1)
        elif tag == "patch":
            recs.patches.extend(take(1))
        elif tag == "exclude":
            recs.excluded.extend(take(1))
        else:
            raise UserError(f"its evaluation wrote an unexpected record {tag[:40]!r}",
                            where=conf_path)


def _interpret(recs: _Records, conf_path: Path, *, kernelver: str, arch: str,
               kernel_source_dir: str, kernel_config: Mapping[str, str],
               dkms_tree: str) -> DkmsConf:
    arrays = {name: values for name, (_, values) in recs.variables.items()}

    def scalar(name: str) -> str:
        return arrays.get(name, {}).get(0, "")

    package_name = scalar("PACKAGE_NAME")
    package_version = scalar("PACKAGE_VERSION")
    if not package_name:
        raise UserError("no PACKAGE_NAME directive", where=conf_path)
    if not package_version:
        raise UserError("no PACKAGE_VERSION directive", where=conf_path)
    module = recs.module or package_name
    module_version = recs.module_version or package_version
    build_dir = f"{dkms_tree}/{module}/{module_version}/build"

    modules = _modules(arrays, package_name, conf_path)

    make_command = recs.make or f"make -C {kernel_source_dir} M={build_dir}"
    clean_command = scalar("CLEAN") or f"make -C {kernel_source_dir} M={build_dir} clean"
    # dkms reads the compiler from vmlinux's .comment, else from .config;
    # header trees carry no vmlinux.
    if kernel_config.get("CONFIG_CC_IS_CLANG") == "y":
        make_command += " CC=clang"
    if kernel_config.get("CONFIG_LD_IS_LLD") == "y":
        make_command += " LD=ld.lld"

    reasons = _exclusions(recs.excluded, arrays, kernelver=kernelver, arch=arch,
                          kernel_config=kernel_config)
    variables: dict[str, str] = {}
    for name, (kind, values) in sorted(recs.variables.items()):
        for index, value in sorted(values.items()):
            variables[f"{name}[{index}]" if kind == "a" else name] = value
    return DkmsConf(
        package_name=package_name,
        package_version=package_version,
        make_command=make_command,
        clean_command=clean_command,
        modules=modules,
        patches=tuple(recs.patches),
        skip_reason="; ".join(reasons) or None,
        variables=variables,
        build_dir=build_dir,
        module=module,
        module_version=module_version,
        pre_build=scalar("PRE_BUILD") or None,
        post_build=scalar("POST_BUILD") or None,
        arrays=arrays,
    )


def _modules(arrays: Mapping[str, Mapping[int, str]], package_name: str,
             conf_path: Path) -> tuple[BuiltModule, ...]:
    # dkms sizes the records by the number of *set* elements of the largest
    # array (${#A[@]}), then walks indices from 0.
    names = arrays.get("BUILT_MODULE_NAME", {})
    locations = arrays.get("BUILT_MODULE_LOCATION", {})
    dest_names = arrays.get("DEST_MODULE_NAME", {})
    dest_locations = arrays.get("DEST_MODULE_LOCATION", {})
    count = max(len(names), len(locations), len(dest_names), len(dest_locations))
    modules = []
    for i in range(count):
        name = names.get(i, "")
        if not name and len(dest_locations) == 1:
            name = package_name
        if not name:
            raise UserError(f"no BUILT_MODULE_NAME for record #{i}", where=conf_path)
        dest = dest_names.get(i, "") or name
        for what, value in (("BUILT_MODULE_NAME", name), ("DEST_MODULE_NAME", dest)):
            if value.endswith((".o", ".ko")):
                raise UserError(f"{what}[{i}] ends in .o or .ko: {value}", where=conf_path)
        modules.append(BuiltModule(name=name, location=locations.get(i, "").rstrip("/"),
                                   dest_name=dest))
    if not modules:
        raise UserError("names no module to build (no BUILT_MODULE_NAME)", where=conf_path)
    return tuple(modules)


def _exclusions(excluded: Sequence[str], arrays: Mapping[str, Mapping[int, str]], *,
                kernelver: str, arch: str, kernel_config: Mapping[str, str]) -> list[str]:
    def scalar(name: str) -> str:
        return arrays.get(name, {}).get(0, "")

    reasons = []
    if "kernel" in excluded:
        reasons.append(f"BUILD_EXCLUSIVE_KERNEL {scalar('BUILD_EXCLUSIVE_KERNEL')!r} "
                       f"does not match kernel {kernelver}")
    low = scalar("BUILD_EXCLUSIVE_KERNEL_MIN")
    if low and dkms_ver(kernelver) < dkms_ver(low):
        reasons.append(f"kernel {kernelver} is older than BUILD_EXCLUSIVE_KERNEL_MIN {low}")
    high = scalar("BUILD_EXCLUSIVE_KERNEL_MAX")
    if high and dkms_ver(kernelver) > dkms_ver(high):
        reasons.append(f"kernel {kernelver} is newer than BUILD_EXCLUSIVE_KERNEL_MAX {high}")
    if "arch" in excluded:
        reasons.append(f"BUILD_EXCLUSIVE_ARCH {scalar('BUILD_EXCLUSIVE_ARCH')!r} "
                       f"does not match architecture {arch}")
    wanted = scalar("BUILD_EXCLUSIVE_CONFIG")
    if wanted and kernel_config:
        for option in wanted.split():
            negated = option.startswith("!")
            name = option[1:] if negated else option
            on = config_enabled(kernel_config, name)
            if negated and on:
                reasons.append(f"the kernel has {name} enabled and BUILD_EXCLUSIVE_CONFIG "
                               f"excludes it ({option})")
            elif not negated and not on:
                reasons.append(f"the kernel lacks {name}, which BUILD_EXCLUSIVE_CONFIG requires")
    return reasons


def config_enabled(kernel_config: Mapping[str, str], option: str) -> bool:
    """Whether *option* is y or m, as dkms's ``grep -E "^OPTION=[ym]"`` decides
    (the option is an extended regex there; plain names are the norm)."""
    if kernel_config.get(option) in ("y", "m"):
        return True
    try:
        pattern = re.compile(option)
    except re.error:
        return False
    return any(v in ("y", "m") and pattern.fullmatch(k) for k, v in kernel_config.items())


def dkms_ver(version: str) -> str:
    """dkms's VER(): every run of digits padded to three, so versions compare
    as strings ("6.1.0-56" -> "006.001.000-056")."""
    words = version.split()
    return re.sub(r"[0-9]+", lambda m: m.group().zfill(3), words[0] if words else "")


def build_command(conf: DkmsConf, *, kernelver: str, jobs: int) -> str:
    """The command dkms's actual_build runs: a leading ``make`` gains
    ``-j<jobs> KERNELRELEASE=<kernelver>``; other commands run as written."""
    if conf.make_command.startswith("make"):
        return f"make -j{jobs} KERNELRELEASE={kernelver}{conf.make_command[4:]}"
    return conf.make_command
