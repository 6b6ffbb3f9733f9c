#!/usr/bin/env bash
# The test command (README, CI): installs what is missing, builds, lints, and runs every test:
# unit tests, then the end-to-end tests that boot real kernels (in the nested-KVM lab when this
# host's /dev/kvm cannot boot Linux). Fails loudly on the first problem.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s\n' "$*" >&2; }

step "setup (packages)"
scripts/setup.sh

step "build"
cargo build --workspace --all-targets --locked

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "guest kernel (cached after the first build)"
target/x86_64-unknown-linux-gnu/debug/xcgi kernel build

step "examples and their images"
XCGI=target/x86_64-unknown-linux-gnu/debug/xcgi scripts/build-examples.sh

step "dist/: systemd units, container image, Kubernetes manifests"
scripts/check-dist.sh

step "lab assets (for the lab tests and guests without hardware KVM; cached after the first build)"
target/x86_64-unknown-linux-gnu/debug/xcgi lab --prepare

step "unit tests"
cargo test --workspace --locked --lib --bins

step "fuzzing (each target 30 s: the parsers and devices that take untrusted bytes)"
scripts/fuzz.sh 30

step "end-to-end tests (boot real kernels; one at a time, each may start the lab)"
cargo test --workspace --locked --test '*' -- --test-threads=1
