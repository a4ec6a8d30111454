#!/usr/bin/env bash
# Install what fcq's demo and tests need on Debian 12, idempotently:
# apt packages (only the missing ones), a virtualenv with fcq in it, and the
# tiny test guest. A second run with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
APT_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-guest-agent qemu-block-extra seabios
    busybox-static xfsprogs util-linux kmod cpio gzip redis-server curl
    python3 python3-venv python3-dev
    ceph-mon ceph-osd ceph-common python3-rados python3-rbd
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to install packages" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "install-deps: creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.fcq-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "install-deps: pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
fi

# Ceph's Python bindings exist only as Debian packages (no PyPI release):
# put exactly those two modules on the virtualenv's path, through a .pth
# naming a folder of symlinks, not the whole of Debian's dist-packages.
bindings="$(realpath "$VENV")/ceph-bindings"
mkdir -p "$bindings"
for mod in rados rbd; do
    so=$(ls /usr/lib/python3/dist-packages/$mod.cpython-311-*.so)
    ln -sfn "$so" "$bindings/$(basename "$so")"
done
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/fcq-ceph-bindings.pth" 2>/dev/null)" != "$bindings" ]; then
    echo "$bindings" > "$site/fcq-ceph-bindings.pth"
fi

"$VENV/bin/python" tools/guest/build.py build/guest
