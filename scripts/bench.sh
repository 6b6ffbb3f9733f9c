#!/usr/bin/env bash
# Benchmarks for docs/benchmarks.md. Prints its figures; run on an otherwise idle machine.
#  1. VMM setup (process spawn -> first KVM_RUN) on this host's /dev/kvm, which runs VMM setup
#     natively even where it cannot boot Linux: 128 MiB and 1 GiB, 4 KiB vs 2 MiB pages, and
#     the request path of a VM prepared ahead; then against memory size, 128 MiB to 4 GiB,
#     with the chart (docs/plots/setup-vs-memory.svg).
#  2. Boot to init: xcgi vs QEMU `-M microvm -enable-kvm`, same kernel and initramfs, same
#     run; inside the lab unless this host has hardware KVM. Then the sweep against memory
#     size and page size (4 KiB, 2 MiB): boot to init for both VMMs (chart written to
#     $BOOT_SVG), and boot to network-ready for xcgi (bench/net-ready-sweep.sh).
#  4. Host memory per VM: guest pages touched, huge pages, VMM overhead (bench/memory.sh).
#  5. The gateway against lighttpd mod_cgi, same CGI program (bench/vs-lighttpd.sh).
#   RUNS=20 BOOT_RUNS=5 SWEEP_RUNS=3 SWEEP_MEM=128,512,2048,4096 scripts/bench.sh
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
$X bench setup --kernel "$KERNEL" --initramfs "$CPIO" --mem 128,1024 --runs "$RUNS" --populate --net --prepared --reserve-hugepages
$X bench setup --kernel "$KERNEL" --initramfs "$CPIO" --mem 128,512,1024,2048,4096 --runs 5 --populate --prepared \
  --reserve-hugepages --svg docs/plots/setup-vs-memory.svg
echo
echo "## 1b. snapshot clones to the first KVM_RUN: cold restore, prepared clone request path (issue 13)"
$X bench restore --kernel "$KERNEL" --initramfs "$CPIO" --mem 128,1024,4096 --runs "$RUNS"
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
echo "## 2b. boot to init and to network-ready against memory size and page size"
SWEEP_RUNS=${SWEEP_RUNS:-3}
SWEEP_MEM=${SWEEP_MEM:-128,512,2048,4096}
BOOT_SVG=${BOOT_SVG:-docs/plots/boot-vs-memory.svg}
HELLO_HTTP=target/examples/http-hello/http-hello
sweep_max=$(echo "$SWEEP_MEM" | tr ',' '\n' | sort -n | tail -1)
if [ "$HW_KVM" = 1 ]; then
  # Both raise vm.nr_hugepages for the 2 MiB runs when needed (root) and put it back.
  $X bench boot --kernel "$KERNEL" --initramfs "$CPIO" --runs "$SWEEP_RUNS" --mem "$SWEEP_MEM" \
    --pages 4k,2m --svg "$BOOT_SVG"
  PATH=$(dirname "$X"):$PATH bench/net-ready-sweep.sh "$KERNEL" "$PWD/$HELLO_HTTP" "$SWEEP_RUNS" \
    "$SWEEP_MEM" 4k,2m
else
  # One lab CPU (two soft-lock with nested guests); lab memory: the largest guest's huge
  # pages reserved at the lab's boot, plus 2 GiB. THP off inside, so "4K" means 4 KiB pages
  # for both VMMs (QEMU would otherwise get transparent huge pages through MADV_HUGEPAGE).
  # The chart is written inside the lab and printed at once (a lab that hangs later, as one
  # did in the network-ready part, keeps it); it is cut out of the output here.
  sweep_log=$(mktemp)
  $X lab --cpus 1 --mem $((sweep_max + 2048)) --hugepages $((sweep_max / 2)) --timeout 3000 \
    --bin /usr/bin/qemu-system-x86_64:/usr/bin/qemu-system-x86_64 --bin /usr/bin/curl:/usr/bin/curl \
    --files "$fw:/xcgi/qemu" --files "$KERNEL:/xcgi/vmlinux" --files "$CPIO:/xcgi/hello.cpio" \
    --files "$HELLO_HTTP:/xcgi/http-hello" --files bench/net-ready-sweep.sh:/xcgi/net-ready-sweep.sh -- \
    "echo never > /sys/kernel/mm/transparent_hugepage/enabled;" \
    "xcgi bench boot --kernel /xcgi/vmlinux --initramfs /xcgi/hello.cpio --runs $SWEEP_RUNS" \
      "--mem $SWEEP_MEM --pages 4k,2m --svg /tmp/boot.svg --qemu /usr/bin/qemu-system-x86_64" \
      "--qemu-datadir /xcgi/qemu; a=\$?; cat /tmp/boot.svg;" \
    "sh /xcgi/net-ready-sweep.sh /xcgi/vmlinux /xcgi/http-hello $SWEEP_RUNS $SWEEP_MEM 4k,2m; b=\$?;" \
    "[ \$a = 0 ] && [ \$b = 0 ]" | tee "$sweep_log" ||
    echo "(the sweep reported failures: see above)"
  sed -n '/^<svg/,/^<\/svg>/p' "$sweep_log" > "$BOOT_SVG"
  rm -f "$sweep_log"
  echo "# chart: $BOOT_SVG"
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
echo
echo "## 4. host memory per VM (guest pages touched, huge pages, VMM overhead)"
MEM_RUNS=${MEM_RUNS:-5}
if [ "$HW_KVM" = 1 ]; then
  PATH=$(dirname "$X"):$PATH bench/memory.sh "$KERNEL" "$CPIO" "$MEM_RUNS"
else
  $X lab --cpus 1 --mem 3072 --hugepages 600 --timeout 1400 --files "$KERNEL:/xcgi/vmlinux" \
    --files "$CPIO:/xcgi/hello.cpio" --files bench/memory.sh:/xcgi/memory.sh -- \
    sh /xcgi/memory.sh /xcgi/vmlinux /xcgi/hello.cpio "$MEM_RUNS"
fi
echo
echo "## 5. the gateway's own overhead: xcgi --isolation process vs lighttpd mod_cgi (host)"
bench/vs-lighttpd.sh "$X"
