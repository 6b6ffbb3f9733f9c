#!/usr/bin/env bash
# Installs everything xcgi needs on a fresh Debian 12 machine. Idempotent.
set -euo pipefail
PKGS=(qemu-system-x86 busybox-static linux-source-6.12 flex bison bc libelf-dev libssl-dev
      golang-go cpio e2fsprogs wrk curl iproute2 xz-utils make gcc file haproxy systemd cgit git)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: packages ok" >&2
# cargo-fuzz, for scripts/fuzz.sh (its targets build with the nightly toolchain where there is
# one, else with this one). Skipped when already installed or where Rust is not.
if command -v cargo >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz (crates.io)" >&2
  cargo install cargo-fuzz --locked --quiet
fi
echo "setup: tools ok" >&2
