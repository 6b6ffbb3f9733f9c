#!/usr/bin/env bash
# Benchmarks for docs/benchmarks.md. Prints its figures; run on an otherwise idle machine.
#  1. VMM setup (process spawn -> first KVM_RUN) on this host's /dev/kvm, which runs VMM setup
#     natively even where it cannot boot Linux: 128 MiB and 1 GiB, 4 KiB vs 2 MiB pages.
#  2. Boot to init: xcgi vs QEMU `-M microvm -enable-kvm`, same kernel and initramfs, same
#     run; inside the lab unless this host has hardware KVM.
#   RUNS=20 BOOT_RUNS=5 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-20}
BOOT_RUNS=${BOOT_RUNS:-5}
. scripts/release-env.sh
CPIO=target/examples/hello-c.cpio
echo "## machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "## kernel: $KERNEL ($(stat -c %s "$KERNEL") bytes)"
echo
echo "## 1. VMM setup on this host"
$X bench setup --kernel "$KERNEL" --initramfs "$CPIO" --mem 128,1024 --runs "$RUNS" --populate --net --reserve-hugepages
echo
echo "## 2. boot to init, xcgi vs QEMU microvm"
if [ "$HW_KVM" = 1 ]; then
  $X bench boot --kernel "$KERNEL" --initramfs "$CPIO" --runs "$BOOT_RUNS"
else
  echo "(inside the lab: QEMU/TCG with nested KVM; absolute times are not product figures, the ratio is)"
  fw=$(mktemp -d)
  trap 'rm -rf "$fw"' EXIT
  cp /usr/share/qemu/bios-microvm.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/pvh.bin "$fw"/
  $X lab --timeout 1200 --bin /usr/bin/qemu-system-x86_64:/usr/bin/qemu-system-x86_64 \
    --files "$fw:/xcgi/qemu" --files "$KERNEL:/xcgi/vmlinux" --files "$CPIO:/xcgi/hello.cpio" -- \
    xcgi bench boot --kernel /xcgi/vmlinux --initramfs /xcgi/hello.cpio --runs "$BOOT_RUNS" \
      --qemu /usr/bin/qemu-system-x86_64 --qemu-datadir /xcgi/qemu
fi
echo
echo "## 3. boot to network-ready (host's first accepted TCP connection), ipconfig patch vs none"
UNPATCHED=$($X kernel build --no-patches --quiet)
HTTP=target/examples/http-hello/http-hello
NET_RUNS=${NET_RUNS:-10}
if [ "$HW_KVM" = 1 ]; then
  PATH=$(dirname "$X"):$PATH bench/net-ready.sh "$KERNEL" "$UNPATCHED" "$PWD/$HTTP" "$NET_RUNS"
else
  echo "(inside the lab: a 10 ms difference is within the lab's boot-to-boot noise)"
  $X lab --cpus 1 --timeout 1800 --bin /usr/bin/curl:/usr/bin/curl --files "$KERNEL:/xcgi/patched" \
    --files "$UNPATCHED:/xcgi/unpatched" --files "$HTTP:/xcgi/http-hello" \
    --files bench/net-ready.sh:/xcgi/net-ready.sh -- \
    sh /xcgi/net-ready.sh /xcgi/patched /xcgi/unpatched /xcgi/http-hello "$NET_RUNS"
fi
