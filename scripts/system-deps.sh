#!/usr/bin/env bash
# Installs the Debian packages the QEMU, libvirt and systemd-unit tests need,
# when we are root and they are missing. Without root, those tests skip and
# say how to install them.
set -u
need=()
command -v qemu-system-s390x >/dev/null 2>&1 || need+=(qemu-system-misc)
command -v s390x-linux-gnu-as >/dev/null 2>&1 || need+=(binutils-s390x-linux-gnu)
# The deployment test's private libvirtd (tests/test_libvirt.py); not
# libvirt-daemon-system, which brings systemd as a service manager and iptables.
command -v libvirtd >/dev/null 2>&1 || need+=(libvirt-daemon)
ls /usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so >/dev/null 2>&1 ||
    need+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
# systemd-analyze and systemd-tmpfiles check the unit and the tmpfiles entry.
{ command -v systemd-analyze && command -v systemd-tmpfiles && command -v systemd-escape; } \
    >/dev/null 2>&1 || need+=(systemd)
# strace lists the daemon's system calls against the unit's SystemCallFilter=.
command -v strace >/dev/null 2>&1 || need+=(strace)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${need[*]}; install with: sudo apt-get install -y ${need[*]}" >&2
    echo "system-deps: the tests that need them will skip." >&2
    exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
    echo "system-deps: apt-get install ${need[*]} failed" >&2
    [ -n "${CI:-}" ] && exit 1
    exit 0
}
