#!/usr/bin/env bash
# The main job, from a fresh machine: build xcgi, the guest kernel and the hello example, then
# boot the kernel straight into it with `xcgi run` (inside the nested-KVM lab when this host's
# /dev/kvm cannot boot a standard Linux guest). Exits with the guest program's exit code (4).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/release-env.sh
IMG=target/examples/hello-c.ext4
if [ "$HW_KVM" = 1 ]; then
  exec $X run --kernel "$KERNEL" --rootfs "$IMG" "$@"
else
  echo "hello: no hardware KVM here; booting inside the lab (QEMU/TCG with nested KVM)" >&2
  exec $X lab --files "$KERNEL:/xcgi/vmlinux" --files "$IMG:/xcgi/hello.ext4" -- \
    xcgi run --kernel /xcgi/vmlinux --rootfs /xcgi/hello.ext4 "$@"
fi
