#!/usr/bin/env bash
# The main job on the embedded defaults: real Debian kernels from the archive.
#  1. list the kernel builds the host's apt sources offer;
#  2. check every module of the oldest and the newest 6.1 image against both
#     kernels (the "how many modules built for A still load on B" question);
#  3. show what changed in the exported ABI between the two and whom it breaks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
kmodgate() { .venv/bin/kmodgate "$@"; }

echo "== kernel builds the archive offers (amd64 flavour)"
mapfile -t kernels < <(kmodgate kernels --available --flavour amd64 | grep -E '^debian:[0-9.]+-[0-9]+-amd64$')
printf '%s\n' "${kernels[@]}"
old=${kernels[0]}
new=${kernels[-1]}
old_release=${old#debian:}
new_release=${new#debian:}

echo
echo "== abi check: the in-tree modules of $old_release and $new_release on both kernels"
status=0
kmodgate check --kind abi --kernel "$old" --kernel "$new" \
    --module "debian-image:$old_release" --module "debian-image:$new_release" || status=$?

echo
echo "== exported ABI diff $old_release -> $new_release"
kmodgate diff "$old" "$new" || true

# Exit 1 only says that some module does not load on some kernel, which is the
# expected finding across ABIs; errors (2, 3) are real failures of the job.
if [ "$status" -gt 1 ]; then exit "$status"; fi
