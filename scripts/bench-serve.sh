#!/usr/bin/env bash
# The price of VM isolation (docs/benchmarks.md): `xcgi serve` with a fresh VM per request (booted,
# and cloned from a snapshot) vs
# `--isolation process` (a CGI child per request), same hello handler (examples/cgi-c), same
# machine, same run: p50/p99 latency of sequential requests, and requests/s under wrk.
# Inside the lab unless this host has hardware KVM (then the absolute times are the product's).
#   N=30 SECS=20 C=2 scripts/bench-serve.sh
#   HUGE=1 ...                     # also clones on 2 MiB pages (a fourth server)
#   GAP=0.5 ...                    # 0.5 s between the sequential requests (default: none)
#   KINDS="snapshot snapcold process" ...   # which servers (bench/serve-compare.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-30}; SECS=${SECS:-20}; C=${C:-2}
. scripts/release-env.sh
INIT=$(dirname "$X")/xcgi-init
CGI=target/examples/cgi-c/cgi
echo "## machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if [ "$HW_KVM" = 1 ]; then
  echo "## mode: host (hardware KVM)"
  PATH=$(dirname "$X"):$PATH bench/serve-compare.sh "$KERNEL" "$PWD/$CGI" "$N" "$SECS" "$C"
else
  echo "## mode: lab (QEMU/TCG with nested KVM: absolute VM times are not product figures, the ratio is)"
  # The lab's root has no "nobody" for process isolation's handlers: it gets one.
  $X lab --cpus 1 --timeout 1800 --bin /usr/bin/curl:/usr/bin/curl --bin /usr/bin/wrk:/usr/bin/wrk \
    --files "$INIT:/usr/bin/xcgi-init" --files "$KERNEL:/xcgi/vmlinux" --files "$CGI:/xcgi/cgi" \
    --files bench/serve-compare.sh:/xcgi/serve-compare.sh -- \
    "grep -q '^nobody:' /etc/passwd || echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> /etc/passwd;" \
    HUGE=${HUGE:-0} GAP=${GAP:-0} KINDS=\"${KINDS:-boot snapshot process}\" sh /xcgi/serve-compare.sh /xcgi/vmlinux /xcgi/cgi "$N" "$SECS" "$C"
  echo "## process isolation natively on this host (no lab), for reference"
  PATH=$(dirname "$X"):$PATH
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  cat > "$tmp/p.toml" <<T
[server]
listen = "127.0.0.1:0"
isolation = "process"
concurrency = $C
[[route]]
prefix = "/hello"
handler = "$PWD/$CGI"
T
  $X serve --config "$tmp/p.toml" 2> "$tmp/log" & pid=$!
  until grep -q 'listening on' "$tmp/log"; do sleep 0.1; done
  addr=$(grep -o 'http://[0-9.:]*' "$tmp/log" | head -1)
  wrk -t1 -c"$C" -d"${SECS}s" --latency "$addr/hello" | grep -E 'Requests/sec|50%|99%'
  kill -TERM $pid; wait $pid || true
fi
