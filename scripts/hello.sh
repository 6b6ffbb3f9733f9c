#!/usr/bin/env bash
# The main job, from a fresh machine: build xcgi, xcgi-init, the guest kernel and the examples,
# then run `xcgi serve` and answer real HTTP requests (curl), each one from a brand-new microVM:
# the C CGI example, the busybox shell CGI, the Go CGI. Inside the nested-KVM lab when this
# host's /dev/kvm cannot boot a standard Linux guest. Exits 0 when every answer is right.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/release-env.sh
INIT=$(dirname "$X")/xcgi-init
E=target/examples
JOB='
set -e
cat > xcgi.toml <<T
[server]
listen = "127.0.0.1:8080"
kernel = "$K"
init = "$INIT"
[[route]]
prefix = "/hello"
handler = "$CGI"
[[route]]
prefix = "/sh"
handler = "$SH"
tree = "$TREE"
[[route]]
prefix = "/go"
handler = "$GO"
T
xcgi serve --config xcgi.toml 2> serve.log &
pid=$!
trap "kill -TERM $pid 2>/dev/null; wait $pid" EXIT
until grep -q "listening on" serve.log; do kill -0 $pid || { cat serve.log; exit 1; }; sleep 0.1; done
check() { # URL EXPECTED-SUBSTRING [curl args]
  url=$1; want=$2; shift 2
  body=$(curl -s -m 120 "$@" "$url")
  echo "GET $url -> $body"
  case "$body" in *"$want"*) ;; *) echo "hello: unexpected answer from $url" >&2; cat serve.log >&2; exit 1;; esac
}
check http://127.0.0.1:8080/hello "Hello from CGI in a fresh VM!"
check "http://127.0.0.1:8080/hello/env?x=1" "QUERY_STRING=x=1"
check "http://127.0.0.1:8080/sh?q=2" "Hello from busybox sh!"
check "http://127.0.0.1:8080/go/p" "Hello from Go CGI!" --data-binary body
kill -TERM $pid; wait $pid; trap - EXIT
grep "status=" serve.log
'
if [ "$HW_KVM" = 1 ]; then
  K=$KERNEL INIT=$INIT CGI=$PWD/$E/cgi-c/cgi SH=$PWD/$E/cgi-sh/hello.sh TREE=$PWD/$E/cgi-sh/tree \
    GO=$PWD/$E/cgi-go/cgi-go PATH=$(dirname "$X"):$PATH bash -c "$JOB"
else
  echo "hello: no hardware KVM here; serving inside the lab (QEMU/TCG with nested KVM)" >&2
  printf '%s' "$JOB" > target/hello-job.sh
  exec $X lab --cpus 1 --bin /usr/bin/curl:/usr/bin/curl --files "$INIT:/usr/bin/xcgi-init" \
    --files "$KERNEL:/xcgi/vmlinux" --files "$E/cgi-c/cgi:/xcgi/cgi" \
    --files "$E/cgi-sh/hello.sh:/xcgi/hello.sh" --files "$E/cgi-sh/tree:/xcgi/tree" \
    --files "$E/cgi-go/cgi-go:/xcgi/cgi-go" --files target/hello-job.sh:/xcgi/job.sh -- \
    K=/xcgi/vmlinux INIT=/usr/bin/xcgi-init CGI=/xcgi/cgi SH=/xcgi/hello.sh TREE=/xcgi/tree \
    GO=/xcgi/cgi-go sh /xcgi/job.sh
fi
