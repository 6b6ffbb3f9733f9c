# Sourced by scripts that use a release build (hello.sh, bench.sh): installs what is missing,
# builds xcgi, the guest kernel and the examples, and sets X (the xcgi binary), KERNEL (the
# vmlinux) and HW_KVM (1 when this host's /dev/kvm can boot a standard guest, else 0).
scripts/setup.sh
cargo build --release --locked -p xcgi -p xcgi-init >&2
X=target/x86_64-unknown-linux-gnu/release/xcgi
KERNEL=$($X kernel build)
XCGI=$X scripts/build-examples.sh >&2
HW_KVM=0
if grep -qE '\b(svm|vmx)\b' /proc/cpuinfo && [ -e /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
  HW_KVM=1
fi
