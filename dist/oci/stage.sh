#!/bin/sh
# Lays out the container image's whole file system in OUT (dist/Dockerfile copies it into a
# `FROM scratch` image). Used by the Dockerfile's build stage and by dist/oci/build.sh
# --prebuilt, so both give the same layout. POSIX sh: it runs in the Rust build image.
#
#   dist/oci/stage.sh XCGI XCGI_INIT VMLINUX HANDLER CONFIG OUT
#
# OUT/usr/local/bin/xcgi, xcgi-init    the server and the guest's init (static binaries)
# OUT/usr/local/lib/xcgi/vmlinux       the guest kernel (`xcgi kernel build`)
# OUT/srv/xcgi/hello                   the example CGI handler (examples/cgi-c)
# OUT/etc/xcgi/xcgi.toml               the configuration (dist/oci/xcgi.toml)
# OUT/etc/passwd, group                root and nobody (the process jail's user)
# OUT/tmp, OUT/var/cache/xcgi, OUT/run the server's work directory, cache, /run/netns
set -eu
[ $# -eq 6 ] || { echo "usage: $0 XCGI XCGI_INIT VMLINUX HANDLER CONFIG OUT" >&2; exit 2; }
xcgi=$1 init=$2 vmlinux=$3 handler=$4 config=$5 out=$6
for f in "$xcgi" "$init" "$vmlinux" "$handler" "$config"; do
  [ -f "$f" ] || { echo "stage.sh: $f: not found" >&2; exit 1; }
done
# Static executables only: the image has no dynamic loader and no libc.
for f in "$xcgi" "$init" "$handler"; do
  if command -v file >/dev/null 2>&1 && ! file -L "$f" | grep -qE 'statically linked|static-pie linked'; then
    echo "stage.sh: $f is not statically linked (the image has no libc)" >&2; exit 1
  fi
done
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/usr/local/lib/xcgi" "$out/srv/xcgi" "$out/etc/xcgi" \
  "$out/tmp" "$out/var/cache/xcgi" "$out/run"
# Stripped copies: a debug build is ~95 MB of which most is debug information.
strip -o "$out/usr/local/bin/xcgi" "$xcgi"
strip -o "$out/usr/local/bin/xcgi-init" "$init"
strip -o "$out/srv/xcgi/hello" "$handler"
chmod 0755 "$out/usr/local/bin/xcgi" "$out/usr/local/bin/xcgi-init" "$out/srv/xcgi/hello"
cp "$vmlinux" "$out/usr/local/lib/xcgi/vmlinux"
cp "$config" "$out/etc/xcgi/xcgi.toml"
chmod 0644 "$out/usr/local/lib/xcgi/vmlinux" "$out/etc/xcgi/xcgi.toml"
chmod 1777 "$out/tmp"
chmod 0755 "$out/srv" "$out/srv/xcgi" "$out/etc" "$out/etc/xcgi" "$out/var/cache/xcgi" "$out/run"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' \
  > "$out/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$out/etc/group"
chmod 0644 "$out/etc/passwd" "$out/etc/group"
echo "stage.sh: image tree in $out" >&2
