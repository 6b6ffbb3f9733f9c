#!/usr/bin/env bash
# Builds the xcgi container image from dist/Dockerfile with the engine found here: Docker
# (when its daemon answers), else Podman, else Buildah.
#
#   dist/oci/build.sh [--prebuilt] [--tag NAME] [--engine docker|podman|buildah]
#
# Without --prebuilt the Dockerfile's build stage compiles everything in the Rust image
# (pulls docker.io/library/rust; 10+ minutes with the kernel). With --prebuilt it uses what
# this host built: $XCGI and $XCGI_INIT (default: the release binaries, else the debug
# ones), $VMLINUX (default: what `$XCGI kernel build` prints; built if missing), and
# examples/cgi-c compiled here; they are laid out in target/oci/stage by dist/oci/stage.sh
# and handed over as `--build-context artifacts=target/oci/stage`: no image is pulled.
# ENGINE_OPTS: extra global options for the engine (e.g. "--storage-driver vfs").
set -euo pipefail
cd "$(dirname "$0")/../.."
die() { echo "oci/build: error: $*" >&2; exit 1; }

prebuilt=0 tag=localhost/xcgi:latest engine=
while [ $# -gt 0 ]; do
  case $1 in
    --prebuilt) prebuilt=1 ;;
    --tag) tag=${2:?--tag NAME}; shift ;;
    --engine) engine=${2:?--engine docker|podman|buildah}; shift ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
  shift
done

if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  elif command -v buildah >/dev/null; then engine=buildah
  else die "no container engine: a Docker daemon, podman or buildah (apt-get install buildah)"
  fi
fi
read -r -a opts <<<"${ENGINE_OPTS:-}"

args=(-f dist/Dockerfile -t "$tag")
if [ "$prebuilt" = 1 ]; then
  T=target/x86_64-unknown-linux-gnu
  XCGI=${XCGI:-$( [ -x $T/release/xcgi ] && echo $T/release/xcgi || echo $T/debug/xcgi )}
  XCGI_INIT=${XCGI_INIT:-$(dirname "$XCGI")/xcgi-init}
  [ -x "$XCGI" ] || die "$XCGI not found: cargo build --release -p xcgi -p xcgi-init, or set XCGI"
  [ -x "$XCGI_INIT" ] || die "$XCGI_INIT not found: cargo build -p xcgi-init, or set XCGI_INIT"
  vmlinux=${VMLINUX:-$("$XCGI" kernel build)}
  mkdir -p target/oci
  gcc -static -O2 -Wall -Werror -o target/oci/hello examples/cgi-c/cgi.c
  dist/oci/stage.sh "$XCGI" "$XCGI_INIT" "$vmlinux" target/oci/hello dist/oci/xcgi.toml \
    target/oci/stage
  args+=(--build-context artifacts=target/oci/stage)
fi

echo "oci/build: $engine ${opts[*]} build ${args[*]} ." >&2
case $engine in
  docker) DOCKER_BUILDKIT=1 docker "${opts[@]}" build "${args[@]}" . ;;
  podman|buildah)
    "$engine" "${opts[@]}" build --ignorefile dist/Dockerfile.dockerignore "${args[@]}" . ;;
  *) die "unknown engine $engine" ;;
esac
echo "oci/build: built $tag" >&2
