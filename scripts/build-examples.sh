#!/usr/bin/env bash
# Builds the example guests into target/examples/<name>/<binary> and their root images as
# target/examples/<name>.ext4 and target/examples/<name>.cpio (with `xcgi image build`).
# Idempotent: rerunning rebuilds everything in place. Fails on the first error, and also when
# `xcgi image build` warns (e.g. a binary came out dynamically linked).
#
#   XCGI=target/x86_64-unknown-linux-gnu/release/xcgi scripts/build-examples.sh     # default: target/x86_64-unknown-linux-gnu/debug/xcgi
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
XCGI=${XCGI:-target/x86_64-unknown-linux-gnu/debug/xcgi}
OUT=$ROOT/target/examples

die() { echo "build-examples: error: $*" >&2; exit 1; }

[ -x "$XCGI" ] || die "$XCGI not found or not executable: build it first (cargo build -p xcgi), or set XCGI=path/to/xcgi"
command -v gcc >/dev/null || die "gcc not found: run scripts/setup.sh"
command -v go >/dev/null || die "go not found: run scripts/setup.sh (package golang-go)"
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || die "static glibc (libc.a) missing: apt-get install libc6-dev"

mkdir -p "$OUT"

# image NAME BINARY: both image formats for one binary; any warning is an error.
image() {
  local name=$1 bin=$2 fmt ext log
  for fmt in ext4 initramfs; do
    ext=$([ "$fmt" = ext4 ] && echo ext4 || echo cpio)
    log=$(mktemp)
    if ! "$XCGI" image build --program "$bin" --format "$fmt" --output "$OUT/$name.$ext" \
        >/dev/null 2>"$log"; then
      cat "$log" >&2; rm -f "$log"
      die "xcgi image build failed for $name ($fmt)"
    fi
    if grep -qi warn "$log"; then
      cat "$log" >&2; rm -f "$log"
      die "xcgi image build warned for $name ($fmt); the example must be a static binary"
    fi
    rm -f "$log"
    echo "build-examples: $OUT/$name.$ext" >&2
  done
}

# C examples: static glibc.
cc_static() {
  local name=$1 src=$2 bin=$3
  mkdir -p "$OUT/$name"
  gcc -static -O2 -Wall -Werror -o "$OUT/$name/$bin.tmp" "$src" || die "gcc failed for $name"
  mv -f "$OUT/$name/$bin.tmp" "$OUT/$name/$bin"
  echo "build-examples: $OUT/$name/$bin" >&2
  image "$name" "$OUT/$name/$bin"
}

cc_static hello-c examples/hello-c/hello.c hello
cc_static loop-forever examples/loop-forever/loop.c loop
cc_static http-hello examples/http-hello/http-hello.c http-hello

# CGI examples (served by `xcgi serve`, which packs them with xcgi-init; no image here).
mkdir -p "$OUT/cgi-c"
gcc -static -O2 -Wall -Werror -o "$OUT/cgi-c/cgi.tmp" examples/cgi-c/cgi.c || die "gcc failed for cgi-c"
mv -f "$OUT/cgi-c/cgi.tmp" "$OUT/cgi-c/cgi"
echo "build-examples: $OUT/cgi-c/cgi" >&2
# The shell CGI's guest tree: a static busybox as /bin/sh (and its applets the script uses).
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && file -L "$BUSYBOX" | grep -q 'statically linked' \
  || die "a static busybox is needed at $BUSYBOX: apt-get install busybox-static"
rm -rf "$OUT/cgi-sh"
mkdir -p "$OUT/cgi-sh/tree/bin"
cp "$BUSYBOX" "$OUT/cgi-sh/tree/bin/busybox"
for applet in sh head cat echo; do ln -s busybox "$OUT/cgi-sh/tree/bin/$applet"; done
cp examples/cgi-sh/hello.sh "$OUT/cgi-sh/hello.sh"
echo "build-examples: $OUT/cgi-sh/hello.sh (tree $OUT/cgi-sh/tree)" >&2

# Go example: CGO off gives a static binary. Keep Go's caches inside target/ when HOME is unset.
mkdir -p "$OUT/hello-go"
export GOCACHE=${GOCACHE:-${HOME:+$HOME/.cache/go-build}}
export GOCACHE=${GOCACHE:-$ROOT/target/go-cache}
(cd examples/hello-go && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=mod \
   go build -trimpath -ldflags='-s -w' -o "$OUT/hello-go/hello-go.tmp" .) \
  || die "go build failed for hello-go"
mv -f "$OUT/hello-go/hello-go.tmp" "$OUT/hello-go/hello-go"
echo "build-examples: $OUT/hello-go/hello-go" >&2
image hello-go "$OUT/hello-go/hello-go"

mkdir -p "$OUT/cgi-go"
(cd examples/cgi-go && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=mod \
   go build -trimpath -ldflags='-s -w' -o "$OUT/cgi-go/cgi-go.tmp" .) \
  || die "go build failed for cgi-go"
mv -f "$OUT/cgi-go/cgi-go.tmp" "$OUT/cgi-go/cgi-go"
echo "build-examples: $OUT/cgi-go/cgi-go" >&2

# HTTP-mode guest in Go (net/http), for the HTTP-mode reproduction loop (scripts/repro-http-mode.sh).
mkdir -p "$OUT/http-go"
(cd examples/http-go && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=mod \
   go build -trimpath -ldflags='-s -w' -o "$OUT/http-go/http-go.tmp" .) \
  || die "go build failed for http-go"
mv -f "$OUT/http-go/http-go.tmp" "$OUT/http-go/http-go"
echo "build-examples: $OUT/http-go/http-go" >&2
image http-go "$OUT/http-go/http-go"

echo "build-examples: all examples built in $OUT" >&2
