#!/usr/bin/env bash
# What the process jail costs (docs/benchmarks.md section 9): the C CGI greeting served by
# `xcgi serve --isolation process` with the jail's cgroup on and off, and optionally by an
# older xcgi without the jail, side by side, wrk at 1 and 8 connections, each run twice,
# alternating. Prints requests/s per server and connection count.
#
#   bench/process-jail.sh [XCGI] [OLD_XCGI]     # default XCGI: the debug build
set -euo pipefail
cd "$(dirname "$0")/.."
XCGI=${1:-target/x86_64-unknown-linux-gnu/debug/xcgi}
OLD=${2:-}
command -v wrk >/dev/null || { echo "wrk missing: run scripts/setup.sh" >&2; exit 1; }
[ -x target/examples/cgi-c/cgi ] || XCGI=$XCGI scripts/build-examples.sh >/dev/null
dir=$(mktemp -d); chmod 755 "$dir"; cp target/examples/cgi-c/cgi "$dir/cgi"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
start() { # NAME BINARY PORT PROCESS_SECTION
  printf '[server]\nlisten = "127.0.0.1:%s"\nisolation = "process"\n%s\n[[route]]\nprefix = "/cgi"\nhandler = "%s/cgi"\n' \
    "$3" "$4" "$dir" > "$dir/$1.toml"
  "$2" serve --config "$dir/$1.toml" 2>/dev/null & pids+=($!)
}
servers=("cgroup:18301" "nocgroup:18302")
start cgroup "$XCGI" 18301 ""
start nocgroup "$XCGI" 18302 $'[process]\ncgroup = false'
if [ -n "$OLD" ]; then start old "$OLD" 18303 ""; servers+=("old:18303"); fi
sleep 2
for c in 1 8; do
  for round in 1 2; do
    for s in "${servers[@]}"; do
      rate=$(wrk -t1 -c"$c" -d4s "http://127.0.0.1:${s#*:}/cgi" | awk '/Requests\/sec/ {print $2}')
      printf '%-9s c=%s round %s: %s req/s\n' "${s%%:*}" "$c" "$round" "$rate"
    done
  done
done
