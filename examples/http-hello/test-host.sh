#!/usr/bin/env bash
# Host-side checks for http-hello (no VM): builds it (static, -Wall -Werror, as
# scripts/build-examples.sh does) into a temporary directory, runs it on a free high port, and
# checks the responses with curl. Exits nonzero on any mismatch; never leaves a server running.
#
#   examples/http-hello/test-host.sh            # needs gcc (with static glibc) and curl;
#                                               # python3 for the raw-socket checks (else skipped)
#   HTTP_HELLO_BIN=path/to/http-hello examples/http-hello/test-host.sh   # test a prebuilt binary
set -euo pipefail
# A relative HTTP_HELLO_BIN is relative to where we were started, not to this directory.
case ${HTTP_HELLO_BIN:-} in ""|/*) ;; *) HTTP_HELLO_BIN=$PWD/$HTTP_HELLO_BIN ;; esac
cd "$(dirname "$0")"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

FAILS=0
pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; FAILS=$((FAILS + 1)); }
die() { echo "test-host: error: $*" >&2; exit 1; }

command -v curl >/dev/null || die "curl not found"
if [ -n "${HTTP_HELLO_BIN:-}" ]; then
  BIN=$HTTP_HELLO_BIN
else
  BIN=$TMP/http-hello
  gcc -static -O2 -Wall -Werror -o "$BIN" http-hello.c || die "gcc failed"
fi
[ -x "$BIN" ] || die "$BIN is not executable"

# start_server LOG [ARGS...]: starts the server on a free high port (retrying a few ports if bind
# fails) and waits for its "listening" line. Sets PORT and SERVER_PID.
start_server() {
  local log=$1 try i
  shift
  for try in 1 2 3 4 5; do
    PORT=$((20000 + RANDOM % 40000))
    "$BIN" "$@" "$PORT" >"$log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for i in $(seq 100); do
      if grep -qx "http-hello: listening on :$PORT" "$log"; then
        return 0
      fi
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.05
    done
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    echo "test-host: server did not start on port $PORT (try $try): $(cat "$log")" >&2
  done
  die "could not start the server"
}

# request NAME CURL_ARGS...: runs curl against the server; headers in $TMP/NAME.h, body in
# $TMP/NAME.b. Sets STATUS to the status line (without CR).
request() {
  local name=$1
  shift
  STATUS=
  if ! curl -sS --max-time 5 -D "$TMP/$name.h" -o "$TMP/$name.b" "$@"; then
    fail "$name: curl failed"
    return 1
  fi
  STATUS=$(head -n1 "$TMP/$name.h" | tr -d '\r')
}

# header NAME FIELD: the value of a response header (case-insensitive name, CR stripped).
header() {
  grep -i "^$2:" "$TMP/$1.h" | head -n1 | cut -d: -f2- | tr -d '\r' | sed 's/^ *//'
}

# raw NAME FORMAT: sends the bytes of `printf FORMAT` over TCP, then half-closes (python3), and puts
# the whole response in $TMP/NAME.r. Sets STATUS to its status line. (No pipeline into raw: it must
# run in this shell to set STATUS and count failures.)
raw() {
  local name=$1
  STATUS=
  # shellcheck disable=SC2059
  printf "$2" >"$TMP/$name.in"
  if ! timeout 10 python3 -c '
import socket, sys
data = sys.stdin.buffer.read()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=8)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.buffer.write(out)
' "$PORT" <"$TMP/$name.in" >"$TMP/$name.r"; then
    fail "$name: raw request failed"
    return 1
  fi
  STATUS=$(head -n1 "$TMP/$name.r" | tr -d '\r')
}

expect_status() { # NAME WANT
  if [ "$STATUS" = "$2" ]; then pass "$1: $STATUS"; else fail "$1: got '$STATUS', want '$2'"; fi
}

# --- serve-forever mode ---------------------------------------------------------------------------
start_server "$TMP/server.log"
echo "# server pid $SERVER_PID on port $PORT"
BASE=http://127.0.0.1:$PORT

if request root "$BASE/"; then
  expect_status "GET /" "HTTP/1.1 200 OK"
  printf 'Hello from a fresh VM!\n' >"$TMP/want.b"
  if cmp -s "$TMP/want.b" "$TMP/root.b"; then pass "GET /: body is exactly 'Hello from a fresh VM!\\n'"
  else fail "GET /: body is '$(od -c "$TMP/root.b" | head -n3)'"; fi
  [ "$(header root Content-Type)" = text/plain ] && pass "GET /: Content-Type: text/plain" \
    || fail "GET /: Content-Type is '$(header root Content-Type)'"
  [ "$(header root Content-Length)" = 23 ] && pass "GET /: Content-Length: 23" \
    || fail "GET /: Content-Length is '$(header root Content-Length)'"
  [ "$(header root Connection)" = close ] && pass "GET /: Connection: close" \
    || fail "GET /: Connection is '$(header root Connection)'"
fi
# The brief's own form of the check, for the record.
curl -s -i --max-time 5 "$BASE/" | grep -q '^Hello from a fresh VM!$' && pass "curl -s -i shows the body" \
  || fail "curl -s -i does not show the body"

request query "$BASE/?x=1" && expect_status "GET /?x=1" "HTTP/1.1 200 OK"
if request nope "$BASE/nope"; then
  expect_status "GET /nope" "HTTP/1.1 404 Not Found"
  [ "$(header nope Content-Length)" = "$(wc -c <"$TMP/nope.b" | tr -d ' ')" ] \
    && pass "GET /nope: Content-Length matches the body" || fail "GET /nope: Content-Length mismatch"
fi
if request post -X POST --data 'a=1&b=2' "$BASE/"; then
  expect_status "POST /" "HTTP/1.1 405 Method Not Allowed"
  [ "$(header post Allow)" = GET ] && pass "POST /: Allow: GET" || fail "POST /: Allow is '$(header post Allow)'"
fi
request put -X PUT --data-binary @"$BIN" "$BASE/" && expect_status "PUT / with a large body" "HTTP/1.1 405 Method Not Allowed"
request big -H "X-Big: $(head -c 9000 /dev/zero | tr '\0' a)" "$BASE/" \
  && expect_status "9000-byte header (over the 8 KiB cap)" "HTTP/1.1 400 Bad Request"

# Raw requests and a resetting client need python3 (bash /dev/tcp cannot half-close).
if command -v python3 >/dev/null; then
  raw garbage 'garbage\r\n\r\n' && expect_status "malformed request line" "HTTP/1.1 400 Bad Request"
  raw badver 'GET / HTTP/2.0\r\n\r\n' && expect_status "HTTP/2.0 request line" "HTTP/1.1 400 Bad Request"
  raw cut 'GET / HTTP/1.1\r\nHost: x' && expect_status "head cut short by EOF" "HTTP/1.1 400 Bad Request"
  raw lf '\r\nGET / HTTP/1.0\n\n' && expect_status "leading CRLF, bare-LF HTTP/1.0 request" "HTTP/1.1 200 OK"
  raw empty '' && { [ ! -s "$TMP/empty.r" ] && pass "connect+close without a request: no response" \
    || fail "connect+close without a request got: $(head -c 100 "$TMP/empty.r")"; }
  # A client that resets the connection mid-request must not hurt the server.
  python3 - "$PORT" <<'EOF' && pass "client reset mid-request" || fail "RST client: python failed"
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.sendall(b"GET / HTT")
s.close()  # SO_LINGER 0: RST
EOF
else
  echo "# python3 not found: skipping the raw-socket checks"
fi
request after "$BASE/" && expect_status "GET / after the bad clients" "HTTP/1.1 200 OK"
kill -0 "$SERVER_PID" 2>/dev/null && pass "server still running after all requests" \
  || fail "server exited (log: $(cat "$TMP/server.log"))"
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true

# --- --once / HTTP_HELLO_ONCE=1 ---------------------------------------------------------------------
# wait_exit PID: waits up to 5 s for PID to exit; sets RC (or fails).
wait_exit() {
  local i
  RC=
  for i in $(seq 100); do
    if ! kill -0 "$1" 2>/dev/null; then
      RC=0
      wait "$1" || RC=$?
      return 0
    fi
    sleep 0.05
  done
  return 1
}

for mode in flag env; do
  if [ $mode = flag ]; then
    start_server "$TMP/once.log" --once
  else
    HTTP_HELLO_ONCE=1 start_server "$TMP/once.log"
  fi
  name="once ($([ $mode = flag ] && echo --once || echo HTTP_HELLO_ONCE=1))"
  request once "http://127.0.0.1:$PORT/" && expect_status "$name: GET /" "HTTP/1.1 200 OK"
  if wait_exit "$SERVER_PID"; then
    [ "$RC" = 0 ] && pass "$name: exited 0 after one request" || fail "$name: exited $RC"
  else
    fail "$name: still running 5 s after its request"
  fi
done

echo "# $FAILS failure(s)"
[ "$FAILS" = 0 ]
