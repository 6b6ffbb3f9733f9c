#!/usr/bin/env bash
# The gateway's own overhead (docs/benchmarks.md section 11): the same C CGI program
# (examples/cgi-c) served by `xcgi serve --isolation process` (default settings, its jail on)
# and by Debian's lighttpd with mod_cgi, same machine, same run. wrk at 1 and 8 connections,
# each server ROUNDS times, alternating; prints requests/s and p99 per run, then the medians
# and the ratio xcgi / lighttpd (requests/s: above 1 is better; p99: below 1 is better).
#
#   bench/vs-lighttpd.sh [XCGI]      # default: the release build; SECS=5 ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
XCGI=${1:-target/x86_64-unknown-linux-gnu/release/xcgi}
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
[ -x "$XCGI" ] || { echo "vs-lighttpd: $XCGI missing: cargo build --release -p xcgi" >&2; exit 1; }
if ! command -v lighttpd >/dev/null || ! command -v wrk >/dev/null; then
  echo "vs-lighttpd: installing lighttpd wrk (Debian)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lighttpd wrk >/dev/null
  systemctl disable --now lighttpd >/dev/null 2>&1 || true
fi
[ -x target/examples/cgi-c/cgi ] || XCGI=$XCGI scripts/build-examples.sh >/dev/null
dir=$(mktemp -d)
chmod 755 "$dir"
cp target/examples/cgi-c/cgi "$dir/cgi"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

# xcgi: what a new user writes (the README's example), process isolation.
cat > "$dir/xcgi.toml" <<T
[server]
listen = "127.0.0.1:18411"
isolation = "process"
[[route]]
prefix = "/cgi"
handler = "$dir/cgi"
T
"$XCGI" serve --config "$dir/xcgi.toml" 2>"$dir/xcgi.log" &
pids+=($!)

# lighttpd: mod_cgi runs the program for /cgi, as nobody (xcgi's handlers run as nobody too).
mkdir -p "$dir/www" && cp "$dir/cgi" "$dir/www/cgi"
cat > "$dir/lighttpd.conf" <<T
server.document-root = "$dir/www"
server.bind = "127.0.0.1"
server.port = 18412
server.username = "nobody"
server.groupname = "nogroup"
server.modules = ("mod_cgi")
cgi.assign = ("/cgi" => "")
T
lighttpd -D -f "$dir/lighttpd.conf" 2>"$dir/lighttpd.log" &
pids+=($!)

for port in 18411 18412; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/cgi" >/dev/null && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$port/cgi" | grep -q . ||
    { echo "vs-lighttpd: the server on port $port does not answer /cgi" >&2; cat "$dir"/*.log >&2; exit 1; }
done

# run NAME PORT CONNS: one wrk run; appends "rate p99_ms" to $dir/NAME-CONNS.
run() {
  local out rate p99
  out=$(wrk -t1 -c"$3" -d"${SECS}s" --latency "http://127.0.0.1:$2/cgi")
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
    echo "vs-lighttpd: $1 answered with errors:" >&2; echo "$out" >&2; exit 1
  fi
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
  echo "$rate $p99" >> "$dir/$1-$3"
  printf '%-8s c=%s: %8s req/s  p99 %6s ms\n' "$1" "$3" "$rate" "$p99"
}
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "## $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $XCGI; $(lighttpd -v 2>&1 | head -1)"
for c in 1 8; do
  for _ in $(seq "$ROUNDS"); do
    run xcgi 18411 "$c"
    run lighttpd 18412 "$c"
  done
done
echo "## medians of $ROUNDS runs of ${SECS}s"
for c in 1 8; do
  xr=$(cut -d' ' -f1 "$dir/xcgi-$c" | med); lr=$(cut -d' ' -f1 "$dir/lighttpd-$c" | med)
  xp=$(cut -d' ' -f2 "$dir/xcgi-$c" | med); lp=$(cut -d' ' -f2 "$dir/lighttpd-$c" | med)
  awk -v c="$c" -v xr="$xr" -v lr="$lr" -v xp="$xp" -v lp="$lp" 'BEGIN {
    printf "c=%s  xcgi %.0f req/s p99 %.2f ms | lighttpd %.0f req/s p99 %.2f ms | ratio req/s %.2fx, p99 %.2fx\n",
      c, xr, xp, lr, lp, xr / lr, xp / lp }'
done
