#!/usr/bin/env bash
# Install what fcq's demo and tests need on Debian 12, idempotently:
# apt packages (only the missing ones), a virtualenv holding exactly the
# packages of requirements/lock.txt (versions and hashes) plus fcq itself,
# and the tiny test guest. A second run with nothing to do takes about a
# second.
#
# The virtualenv counts as complete only when its stamp holds the digest of
# the lock, setup.cfg and setup.py, written as the very last step: one that
# was interrupted (killed during `python3 -m venv` or pip) or built from
# another lock has no such stamp and is built again from nothing. Building
# from nothing is also what keeps strays out: no package outside the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
LOCK=requirements/lock.txt
APT_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-guest-agent qemu-block-extra seabios
    busybox-static xfsprogs util-linux kmod cpio gzip redis-server curl systemd
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

# What this machine has, on one line: compare it with docs/install.md when
# something fails here and not elsewhere.
versions=()
for pkg in qemu-system-x86 ceph-common python3-rbd redis-server seabios; do
    versions+=("$pkg $(dpkg-query -W -f='${Version}' "$pkg")")
done
echo "install-deps: $(IFS=,; echo "${versions[*]}" | sed 's/,/, /g'), $(python3 --version)"

# The lock and Ceph's bindings (cpython-311 modules) are for Python 3.11.
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "install-deps: python3 is $(python3 --version 2>&1), fcq's lock is for 3.11" >&2
    exit 1
fi

want=$(cat "$LOCK" setup.cfg setup.py | sha256sum | cut -d' ' -f1)
stamp="$VENV/.fcq-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV")" ]; then
        echo "install-deps: $VENV exists and is no virtualenv: not removing it" >&2
        exit 1
    fi
    echo "install-deps: building $VENV from $LOCK"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # --require-hashes: every package pinned and checked; --no-deps: the
    # lock is complete, pip adds nothing of its own.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --require-hashes --no-deps -r "$LOCK"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --no-deps --no-build-isolation -e .
    "$VENV/bin/python" -m pip check -q >/dev/null || "$VENV/bin/python" -m pip check
    echo "$want" > "$stamp"
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
