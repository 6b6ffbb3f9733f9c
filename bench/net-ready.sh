#!/bin/sh
# Runs where the VMs boot (hardware-KVM host or the lab): boot to network-ready (the host's
# first accepted TCP connection to the guest's port 80) with the patched kernel (ipconfig
# without its 10 ms CONF_POST_OPEN sleep) and the unpatched one, same run, requests alternated.
# `xcgi serve` in HTTP mode measures it per request (boot_ms in its log line).
#   bench/net-ready.sh PATCHED_VMLINUX UNPATCHED_VMLINUX HTTP_HELLO REQUESTS
set -eu
P=$1; U=$2; H=$3; N=$4
i=0
for k in patched unpatched; do
  kern=$([ $k = patched ] && echo "$P" || echo "$U")
  port=$((8100 + i)); i=$((i+1))
  cat > nr-$k.toml <<T
[server]
listen = "127.0.0.1:$port"
kernel = "$kern"
concurrency = 1
[network]
base = "172.16.$((i*16)).0"
size = 4
prefill = 2
netns = "nr-$k"
[[route]]
prefix = "/"
mode = "http"
handler = "$H"
timeout_ms = 120000
T
  xcgi serve --config nr-$k.toml > nr-$k.log 2>&1 &
  echo $! > nr-$k.pid
  w=0; until grep -q 'listening on' nr-$k.log; do w=$((w+1)); [ $w -lt 600 ] || { cat nr-$k.log; exit 1; }; sleep 0.1; done
done
j=0
while [ $j -lt "$N" ]; do
  for port in 8100 8101; do
    curl -s -m 120 -o /dev/null "http://127.0.0.1:$port/" || echo "request to $port failed"
  done
  j=$((j+1))
done
for k in patched unpatched; do kill -TERM "$(cat nr-$k.pid)"; wait "$(cat nr-$k.pid)" || true; done
for k in patched unpatched; do
  grep -o 'boot_ms=[0-9.]*' nr-$k.log | cut -d= -f2 | sort -n > nr-$k.ms
  n=$(wc -l < nr-$k.ms)
  med=$(awk -v n="$n" 'NR==int((n+1)/2) {printf "%.1f", $1}' nr-$k.ms)
  mean=$(awk '{s+=$1} END {if (NR) printf "%.1f", s/NR}' nr-$k.ms)
  echo "RESULT kernel=$k requests=$n network_ready_median_ms=$med mean_ms=$mean"
done
