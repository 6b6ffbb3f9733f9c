#!/bin/sh
# Runs where the VMs boot (hardware-KVM host or the lab): boot to network-ready (the host's
# first accepted TCP connection to the guest's port 80, `boot_ms` in `xcgi serve`'s log line)
# against guest memory size and page size. One HTTP-mode `xcgi serve`, one route per
# (memory, pages) (`memory_mib`, `hugepages`), requests sent round-robin over the routes; the
# first request of each route is a warm-up and not counted.
#   [PREPARED=0] bench/net-ready-sweep.sh VMLINUX HTTP_HELLO REQUESTS [MEMS [PAGES]]
#   e.g. bench/net-ready-sweep.sh vmlinux http-hello 5 128,512,2048 4k,2m
# PREPARED is the routes' `prepared` (VMs built ahead of their request); the default 0 builds
# each VM on its request, so boot_ms includes VMM setup, which is what grows with memory, and
# only one VM holds memory at a time. 2 MiB pages need free huge pages: the largest size's
# MiB/2, plus PREPARED times every size's; the script raises vm.nr_hugepages when too few
# are free and puts the old value back at the end.
set -eu
K=$1; H=$2; N=$3; MEMS=${4:-128,512,2048}; PAGES=${5:-4k,2m}; PREPARED=${PREPARED:-0}
MEMS=$(echo "$MEMS" | tr ',' ' '); PAGES=$(echo "$PAGES" | tr ',' ' ')
case $K in /*) ;; *) K=$PWD/$K ;; esac
case $H in /*) ;; *) H=$PWD/$H ;; esac
cd "$(mktemp -d)"   # its config, log and figures stay out of the caller's directory
port=8200
cfg=nrs.toml
cat > $cfg <<T
[server]
listen = "127.0.0.1:$port"
kernel = "$K"
concurrency = 1
[network]
base = "172.16.64.0"
size = 4
prefill = 2
netns = "nrs"
T
routes=""
max=0; sum=0
for m in $MEMS; do
  [ "$m" -gt "$max" ] && max=$m
  sum=$((sum + m))
  for p in $PAGES; do
    case $p in 4k|4K) huge=false ;; 2m|2M) huge=true ;; *) echo "page size $p: 4k or 2m" >&2; exit 2 ;; esac
    r="/m$m-$p"; routes="$routes $r"
    cat >> $cfg <<T
[[route]]
prefix = "$r"
mode = "http"
handler = "$H"
strip_prefix = true
memory_mib = $m
hugepages = $huge
prepared = $PREPARED
timeout_ms = 120000
T
  done
done
old_nr=""
case " $PAGES " in *" 2m "*|*" 2M "*)
  need=$((max / 2 + PREPARED * sum / 2))
  free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
  if [ "$free" -lt "$need" ]; then
    old_nr=$(cat /proc/sys/vm/nr_hugepages)
    trap 'echo "$old_nr" > /proc/sys/vm/nr_hugepages' EXIT
    echo $((old_nr + need - free)) > /proc/sys/vm/nr_hugepages || {
      echo "cannot raise vm.nr_hugepages (needs root): $need free 2 MiB pages needed, $free free" >&2; exit 1; }
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
    [ "$free" -ge "$need" ] || { echo "only $free free 2 MiB pages after raising vm.nr_hugepages, $need needed" >&2; exit 1; }
  fi ;;
esac
xcgi serve --config $cfg > nrs.log 2>&1 &
pid=$!
w=0; until grep -q 'listening on' nrs.log; do w=$((w+1)); [ $w -lt 600 ] || { cat nrs.log; kill $pid; exit 1; }; sleep 0.1; done
j=0
while [ $j -le "$N" ]; do   # round 0 is the warm-up
  for r in $routes; do
    case $r in *-2m|*-2M)
      # The previous VM's huge pages come back when its teardown ends: wait for them.
      m=${r#/m}; m=${m%-*}; w=0
      while [ $(awk '/^HugePages_Free:/ {f=$2} /^HugePages_Rsvd:/ {r=$2} END {print f-r}' /proc/meminfo) -lt $((m / 2)) ] && [ $w -lt 100 ]; do
        sleep 0.1; w=$((w+1))
      done ;;
    esac
    before=$(grep -c "route=$r " nrs.log || true)
    curl -s -m 120 -o /dev/null "http://127.0.0.1:$port$r/" || echo "request to $r failed"
    # Print each request's figure as it comes (its log line follows the VM's end), so that a
    # run cut short still shows what it measured.
    w=0; while [ "$(grep -c "route=$r " nrs.log || true)" -le "$before" ] && [ $w -lt 50 ]; do sleep 0.1; w=$((w+1)); done
    echo "request $j$([ $j = 0 ] && echo ' (warm-up)') $r $(grep "route=$r " nrs.log | tail -1 | grep -o 'boot_ms=[0-9.]*' || echo 'boot_ms=none')"
  done
  j=$((j+1))
done
kill -TERM $pid; wait $pid || true
fail=0
echo "# boot to network-ready (host: start of building the VM to the first accepted TCP connection), $N requests per row after 1 warm-up, prepared=$PREPARED, kernel $K"
printf '%8s %5s %9s %10s %10s %10s\n' "mem MiB" pages requests "median ms" "min ms" "max ms"
for r in $routes; do
  # Log lines are per request, in order; the route's first one is the warm-up.
  grep "route=$r " nrs.log | grep -o 'boot_ms=[0-9.]*' | cut -d= -f2 | tail -n +2 | sort -n > nrs.ms || true
  n=$(wc -l < nrs.ms)
  [ "$n" -eq "$N" ] || fail=1
  med=$(awk -v n="$n" 'NR==int((n+1)/2) {printf "%.1f", $1}' nrs.ms)
  min=$(awk 'NR==1 {printf "%.1f", $1}' nrs.ms)
  max=$(awk '{v=$1} END {if (NR) printf "%.1f", v}' nrs.ms)
  m=${r#/m}; p=${m#*-}; m=${m%-*}
  printf '%8s %5s %9s %10s %10s %10s\n' "$m" "$p" "$n" "${med:--}" "${min:--}" "${max:--}"
  echo "RESULT mem_mib=$m pages=$p requests=$n network_ready_median_ms=${med:-nan} min_ms=${min:-nan} max_ms=${max:-nan}"
done
if [ $fail = 1 ]; then
  echo "not every request got a boot_ms (see the log below)" >&2
  grep -v ' INFO ' nrs.log | tail -20 >&2
  exit 1
fi
