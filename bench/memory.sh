#!/bin/sh
# Runs where the VMs boot (hardware-KVM host or the lab): host memory behind one VM, per
# memory size and page size. Each run is `xcgi run --memory-stats` of the hello example to its
# end: guest pages touched (4 KiB resident / 2 MiB huge pages, from /proc/self/pagemap) and
# the process's peak RSS beyond them (the VMM's own overhead), and the private part of it
# (anonymous memory that is not guest RAM; the rest is the xcgi executable's shared pages).
#   bench/memory.sh VMLINUX INITRAMFS RUNS
set -eu
K=$1; I=$2; N=${3:-3}
# The 1 GiB huge-page runs need 512 free huge pages: raise vm.nr_hugepages (root) if short,
# and put it back at the end.
free=$(awk '/^HugePages_Free:/ {f=$2} /^HugePages_Rsvd:/ {r=$2} END {print f-r}' /proc/meminfo)
if [ "$free" -lt 520 ]; then
  old_nr=$(cat /proc/sys/vm/nr_hugepages)
  trap 'echo "$old_nr" > /proc/sys/vm/nr_hugepages' EXIT
  echo $((old_nr + 520 - free)) > /proc/sys/vm/nr_hugepages
fi
echo "mem_mib pages run guest_4k_kib huge_pages shared_file_kib process_peak_kib overhead_kib private_overhead_kib exit"
for mem in 128 1024; do
  for pages in 4k 2m; do
    flag=""; [ $pages = 2m ] && flag="--hugepages"
    r=1
    while [ $r -le "$N" ]; do
      out=$(xcgi run --kernel "$K" --initramfs "$I" --mem $mem $flag --memory-stats --timeout 120 2>&1) && code=0 || code=$?
      line=$(echo "$out" | grep 'xcgi: memory:' || true)
      # "guest touched A KiB in 4 KiB pages + B huge pages | F KiB ... | process peak RSS C KiB | overhead ... D KiB"
      set -- $(echo "$line" | tr -c '0-9\n' ' ')
      echo "$mem $pages $r ${1:-?} ${3:-?} ${4:-?} ${5:-?} ${6:-?} ${7:-?} $code"
      r=$((r+1))
    done
  done
done
