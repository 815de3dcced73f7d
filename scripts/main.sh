#!/usr/bin/env bash
# The main job on the embedded defaults: SQLite, the local executor, real
# Debian kernels and DKMS packages from the archive through the host's apt.
#  1. the kernel builds the archive offers;
#  2. the abi check: every module of the oldest and newest 6.1 image on both
#     kernels ("of N modules built for A, M still load on B");
#  3. the build check: four DKMS packages against the oldest and newest 6.1
#     and the newest 6.12 kernel, sandboxed, with the first error of each failure;
#  4. the gate: sync the 6.1 line with those packages (examples/kmodgate.toml),
#     the regressions found, and each stream's decision on the newest kernel;
#  5. the advisor: survival of the in-tree modules along the line and the
#     stablelist that would have kept them loading, recorded in the store for
#     the dashboard (`kmodgate serve`, then /advice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
kmodgate() { .venv/bin/kmodgate "$@"; }
section() { printf '\n== %s\n' "$*"; }

section "kernel builds the archive offers (amd64 flavour)"
mapfile -t kernels < <(kmodgate kernels --available --flavour amd64)
printf '%s\n' "${kernels[@]}"
mapfile -t line61 < <(printf '%s\n' "${kernels[@]}" | grep '^debian:6\.1\.')
mapfile -t line612 < <(printf '%s\n' "${kernels[@]}" | grep '^debian:6\.12\.')
old=${line61[0]} new=${line61[-1]} newest612=${line612[-1]}

section "abi check: the in-tree modules of ${old#debian:} and ${new#debian:} on both kernels"
# Exit 1 only says some module does not load on some kernel: the expected
# finding across ABIs. Errors (2, 3) stop the job.
status=0
kmodgate check --kind abi --kernel "$old" --kernel "$new" \
    --module "debian-image:${old#debian:}" --module "debian-image:${new#debian:}" \
    | tail -n 4 || status=$?
[ "$status" -le 1 ] || exit "$status"

section "build check: four DKMS packages on ${old#debian:}, ${new#debian:}, ${newest612#debian:}"
status=0
kmodgate check --kind build --kernel "$old" --kernel "$new" --kernel "$newest612" \
    --module debian:openrazer-driver-dkms --module debian:v4l2loopback-dkms \
    --module debian:dm-writeboost-dkms --module debian:acpi-call-dkms || status=$?
[ "$status" -le 1 ] || exit "$status"

section "the gate: sync the 6.1 line with those packages"
work=${KMODGATE_DEMO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kmodgate/demo}
mkdir -p "$work"
cp examples/kmodgate.toml "$work/kmodgate.toml"
export KMODGATE_CONFIG="$work/kmodgate.toml"
kmodgate sync
for module in openrazer-driver v4l2loopback dm-writeboost acpi-call; do
    kmodgate history "$module" | tail -n +1
done
kmodgate gate status
for stream in next stable; do
    kmodgate gate decide "${new#debian:}" --stream "$stream" || true
done

section "the advisor: in-tree modules of ${old#debian:} along the 6.1 line"
kmodgate advise --kernel debian-line:6.1/amd64 --module "debian-image:${old#debian:}" --top 10 \
    --record
echo "the dashboard: KMODGATE_CONFIG=$KMODGATE_CONFIG .venv/bin/kmodgate serve"
