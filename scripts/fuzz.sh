#!/usr/bin/env bash
# Fuzzes what untrusted guests and clients feed xcgi (the channel's frames, CGI environment and
# response heads, the serial console's exit line, the virtio-mmio devices) with cargo-fuzz
# (libFuzzer, AddressSanitizer): builds every target in fuzz/, then runs each for SECONDS
# (default 30), one at a time, printing how many inputs each one ran.
#
#   scripts/fuzz.sh [SECONDS]
#
# Fails loudly (non-zero) on a build error or on any crash, timeout or leak; the input that
# caused it is kept in fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET FILE, from
# fuzz/..). Corpora grow in fuzz/corpus/TARGET/ from run to run (neither is in git).
# Needs cargo-fuzz (scripts/setup.sh installs it) and the nightly toolchain for the sanitizer
# flags; without nightly, the stable toolchain is told to accept them (RUSTC_BOOTSTRAP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "fuzz: $*" >&2; exit 1; }

secs=${1:-30}
[[ $secs =~ ^[1-9][0-9]*$ ]] || die "usage: scripts/fuzz.sh [SECONDS]  (SECONDS: a whole number, at least 1)"
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
cargo() { command cargo "${toolchain[@]}" "$@"; }
cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz not found: run scripts/setup.sh"

echo "fuzz: building the fuzz targets ($(cargo --version), AddressSanitizer)" >&2
cargo fuzz build || die "build failed"
mapfile -t targets < <(cargo fuzz list)
[ ${#targets[@]} -gt 0 ] || die "no fuzz targets found in fuzz/"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
results=()
failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  echo "fuzz: $t for ${secs}s" >&2
  # -timeout: an input running over 10 s is a hang; -rss_limit_mb: a runaway allocation.
  if cargo fuzz run "$t" -- -max_total_time="$secs" -print_final_stats=1 \
      -timeout=10 -rss_limit_mb=2048 >"$logs/$t.log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
    # The panic message (or sanitizer report) and where the input went.
    grep -E -A3 "panicked at|^==[0-9]+==ERROR|^SUMMARY" "$logs/$t.log" | head -n 30 >&2 || true
    grep -E "Test unit written to|^Running:|artifact_prefix" "$logs/$t.log" | tail -n 2 >&2 || true
  fi
  execs=$(awk '/stat::number_of_executed_units:/ {n = $2} END {print n}' "$logs/$t.log")
  if [ -z "$execs" ]; then
    tail -n 20 "$logs/$t.log" >&2
    execs=0
    status=FAILED
    [[ " ${failed[*]} " == *" $t "* ]] || failed+=("$t")
  fi
  results+=("$(printf '%-20s %12s executions in %ss (%s/s)  %s' "$t" "$execs" "$secs" "$((execs / secs))" "$status")")
done

echo
for r in "${results[@]}"; do echo "$r"; done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (crashing inputs in fuzz/artifacts/TARGET/; replay one with" \
    "cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/FILE)" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${secs}s each without a crash"
