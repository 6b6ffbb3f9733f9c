#!/bin/sh
# Runs where the VMs boot (on a hardware-KVM host, or inside the lab): three xcgi servers, same
# handler (examples/cgi-c), same machine, same run: VM isolation booting a VM per request
# (start = "boot"), VM isolation with snapshot clones (start = "snapshot"), and --isolation
# process. Prints per-request latency (sequential curl) and throughput (wrk).
# With HUGE=1 a fourth server clones on 2 MiB pages (`hugepages = true`, start = "snapshot":
# huge pages are reserved for it, hugetlbfs at /dev/hugepages). KINDS chooses the servers:
# also `snapcold`, clones that do not touch their template's working set ahead
# (`working_set = false`). GAP=S waits S seconds between the sequential requests (latency
# at a light load, with the server idle in between, as opposed to back to back).
#   bench/serve-compare.sh KERNEL CGI_PROGRAM REQUESTS WRK_SECONDS CONCURRENCY
set -eu
K=$1; CGI=$2; N=$3; SECS=$4; C=$5; GAP=${GAP:-0}
KINDS=${KINDS:-boot snapshot process}
if [ "${HUGE:-0}" = 1 ]; then
  KINDS="$KINDS snaphuge"
  # Each clone reserves its 64 pages (C serving + 2 prepared), the template's file a few.
  echo $(( (C + 3) * 64 + 32 )) > /proc/sys/vm/nr_hugepages
fi
port_of() { case $1 in boot) echo 8090;; snapshot) echo 8092;; snaphuge) echo 8093;; snapcold) echo 8094;; *) echo 8091;; esac; }
for iso in $KINDS; do
  port=$(port_of $iso)
  mode=vm; start='start = "boot"'
  [ $iso = process ] && { mode=process; start=""; }
  [ $iso = snapshot ] && start='start = "snapshot"'
  [ $iso = snapcold ] && start='start = "snapshot"
working_set = false'
  [ $iso = snaphuge ] && start='start = "snapshot"
hugepages = true'
  cat > bench-$iso.toml <<T
[server]
listen = "127.0.0.1:$port"
isolation = "$mode"
kernel = "$K"
concurrency = $C
queue = 1024
queue_timeout_ms = 600000
[[route]]
prefix = "/hello"
$start
handler = "$CGI"
timeout_ms = 120000
max_body = 67108864
T
  xcgi serve --config bench-$iso.toml > bench-$iso.log 2>&1 &
  echo $! > bench-$iso.pid
  w=0; until grep -qs 'listening on' bench-$iso.log; do
    w=$((w+1)); [ $w -lt 600 ] || { cat bench-$iso.log; exit 1; }; sleep 0.1; done
done
# pct FILE P: the P-th percentile (nearest rank) of the numbers in FILE, in ms.
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int((p*NR+99)/100); if(i<1)i=1; printf "%.2f", a[i]*1000}'; }
for iso in $KINDS; do
  port=$(port_of $iso)
  url=http://127.0.0.1:$port/hello
  curl -s -o /dev/null "$url"   # warm-up
  : > lat-$iso.txt
  i=0; while [ $i -lt "$N" ]; do
    curl -s -o /dev/null -w '%{time_total}\n' "$url" >> lat-$iso.txt; i=$((i+1))
    [ "$GAP" = 0 ] || sleep "$GAP"; done
  bad=$(curl -s "$url" | grep -c 'Hello from CGI' || true)
  [ "$bad" = 1 ] || { echo "$iso: wrong body"; exit 1; }
  rps=$(wrk -t1 -c"$C" -d"${SECS}s" "$url" | awk '/Requests\/sec/ {print $2}')
  # Large bodies through the handler: 32 MiB down (the handler writes it), 32 MiB up and back.
  down=$(curl -s -o /dev/null -w '%{size_download} %{time_total}' "$url/big?33554432" |
    awk '{printf "%.1f", $1/1048576/$2}')
  head -c 33554432 /dev/zero > up.bin
  echo_rate=$(curl -s -o /dev/null --data-binary @up.bin -w '%{size_download} %{time_total}' "$url/echo" |
    awk '{printf "%.1f", $1/1048576/$2}')
  echo "RESULT isolation=$iso requests=$N gap_s=$GAP p50_ms=$(pct lat-$iso.txt 50) p99_ms=$(pct lat-$iso.txt 99) wrk_c=$C wrk_rps=$rps download_MiBps=$down echo_MiBps=$echo_rate"
done
for iso in $KINDS; do kill -TERM "$(cat bench-$iso.pid)"; wait "$(cat bench-$iso.pid)" || true; done
grep -h 'status=' bench-boot.log | tail -2
grep -h 'status=' bench-snapshot.log | tail -2 || true
grep -h 'working set' bench-snap*.log || true
