#!/bin/sh
# Lab side of scripts/repro-http-mode.sh: `xcgi serve` takes REQUESTS requests in each of
# eight variants (C and Go guests; one route and two; prepared VMs by default and none; with
# and without a 6 MiB tree in the image) and counts what failed, by kind. MODE=cgi runs the
# same variants with the CGI examples instead, for contrast.
#   sh repro-http.sh KERNEL BIN_DIR REQUESTS MODE [VARIANT...]
# BIN_DIR holds http-hello, http-go, cgi-c, cgi-go. Every server logs a debug dump of each VM
# that ends badly ([server] debug_dump); the first of a variant is printed.
K=$1; BIN=$2; R=$3; MODE=$4; shift 4
VARIANTS=${*:-c go c-prepared0 go-prepared0 c-2routes go-2routes c-tree go-tree}
mkdir -p /tmp/repro/tree
# 6 MiB of data the guest never reads: only the image grows.
dd if=/dev/urandom of=/tmp/repro/tree/data.bin bs=1M count=6 2>/dev/null
total=0; failed=0
for v in $VARIANTS; do
  case $v in c*) lang=c ;; go*) lang=go ;; esac
  if [ "$MODE" = http ]; then
    handler=$BIN/http-hello; [ $lang = go ] && handler=$BIN/http-go
  else
    handler=$BIN/cgi-c; [ $lang = go ] && handler=$BIN/cgi-go
  fi
  extra=""; routes="/a"
  case $v in
    *-prepared0) extra="prepared = 0" ;;
    *-2routes) routes="/a /b" ;;
    *-tree) extra="tree = \"/tmp/repro/tree\"" ;;
  esac
  cfg=/tmp/repro/$v.toml
  {
    echo "[server]"
    echo "listen = \"127.0.0.1:8090\""
    echo "kernel = \"$K\""
    echo "concurrency = 1"
    echo "debug_dump = true"
    if [ "$MODE" = http ]; then
      printf '[network]\nbase = "172.16.0.0"\nsize = 8\nnetns = "xcgi-repro"\n'
    fi
    for p in $routes; do
      printf '[[route]]\nprefix = "%s"\nhandler = "%s"\ntimeout_ms = 45000\nstrip_prefix = true\n%s\n' \
        "$p" "$handler" "$extra"
      [ "$MODE" = http ] && printf 'mode = "http"\nport = 80\n'
    done
  } > "$cfg"
  log=/tmp/repro/$v.log
  xcgi serve --config "$cfg" > /dev/null 2> "$log" &
  pid=$!
  w=0
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:8090/_xcgi/readyz)" = 200 ]; do
    w=$((w+1)); [ $w -gt 600 ] && break; sleep 0.2
  done
  ok=0; n502=0; n504=0; other=0; i=0; t0=$(date +%s)
  while [ $i -lt "$R" ]; do
    p=/a; [ "$routes" != "/a" ] && [ $((i % 2)) = 1 ] && p=/b
    code=$(curl -s -o /tmp/repro/body -w '%{http_code}' -m 90 "http://127.0.0.1:8090$p/")
    if [ "$code" = 200 ] && [ -s /tmp/repro/body ]; then ok=$((ok+1))
    elif [ "$code" = 502 ]; then n502=$((n502+1))
    elif [ "$code" = 504 ]; then n504=$((n504+1))
    else other=$((other+1)); echo "    request $i: status $code: $(head -c 200 /tmp/repro/body)"; fi
    i=$((i+1))
  done
  secs=$(( $(date +%s) - t0 ))
  kill -TERM $pid; wait $pid
  bad=$((R - ok)); total=$((total + R)); failed=$((failed + bad))
  echo "variant $MODE/$v: $R requests in ${secs}s: $ok ok, $bad failed (502: $n502, 504: $n504, other: $other);" \
    "log: triple fault $(grep -c 'triple fault' "$log"), did not accept $(grep -c 'did not accept' "$log")," \
    "TAP still exists $(grep -c 'still exists' "$log"), debug dumps $(grep -c 'VM debug dump' "$log")"
  if [ $bad -gt 0 ]; then
    grep -m1 -A60 'VM debug dump' "$log" | sed 's/^/    /'
    grep -E 'WARN|ERROR' "$log" | grep -v 'debug dump' | head -5 | sed 's/^/    /'
  fi
done
echo "total $MODE: $total requests, $failed failed"
