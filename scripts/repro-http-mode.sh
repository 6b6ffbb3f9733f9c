#!/usr/bin/env bash
# The HTTP-mode reproduction loop (issue 15; docs/networking.md, "When a guest fails"): one lab
# session, `xcgi serve` in eight variants (C and Go guests, one and two routes, prepared VMs
# by default and none, with and without a 6 MiB tree), REQUESTS requests each; prints the
# failures of each variant by kind and the first debug dump of a failed VM.
#   scripts/repro-http-mode.sh                 # 25 requests x 8 variants = 200, HTTP mode
#   MODE=cgi scripts/repro-http-mode.sh        # the same loop in CGI mode, for contrast
#   REQUESTS=10 CPUS=2 scripts/repro-http-mode.sh c go-tree   # some variants, two lab CPUs
#   XCGI_LAB_ONESHOT_TIMER=1 scripts/repro-http-mode.sh       # the lab's old timer (lab/src/run.rs)
# Needs the debug build and the examples (cargo build; scripts/build-examples.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
X=${XCGI:-target/x86_64-unknown-linux-gnu/debug/xcgi}
INIT=$(dirname "$X")/xcgi-init
EX=target/examples
REQUESTS=${REQUESTS:-25}
MODE=${MODE:-http}
CPUS=${CPUS:-1}
for f in "$X" "$INIT" "$EX/http-hello/http-hello" "$EX/http-go/http-go" "$EX/cgi-c/cgi" "$EX/cgi-go/cgi-go"; do
  [ -e "$f" ] || { echo "repro-http-mode: $f missing: cargo build; scripts/build-examples.sh" >&2; exit 2; }
done
case $MODE in http | cgi) ;; *) echo "repro-http-mode: MODE is http or cgi" >&2; exit 2 ;; esac
KERNEL=$("$X" kernel build)
echo "## $(date -u +%F) lab, $CPUS CPU(s), mode $MODE, $REQUESTS requests per variant, lab timer: ${XCGI_LAB_ONESHOT_TIMER:+one-shot (old)}${XCGI_LAB_ONESHOT_TIMER:-periodic}"
"$X" lab --cpus "$CPUS" --mem 3072 --timeout 3600 --bin /usr/bin/curl:/usr/bin/curl \
  --files "$INIT:/usr/bin/xcgi-init" --files "$KERNEL:/xcgi/vmlinux" \
  --files "$EX/http-hello/http-hello:/xcgi/bin/http-hello" --files "$EX/http-go/http-go:/xcgi/bin/http-go" \
  --files "$EX/cgi-c/cgi:/xcgi/bin/cgi-c" --files "$EX/cgi-go/cgi-go:/xcgi/bin/cgi-go" \
  --files bench/repro-http.sh:/xcgi/repro-http.sh -- \
  sh /xcgi/repro-http.sh /xcgi/vmlinux /xcgi/bin "$REQUESTS" "$MODE" "$@"
