#!/usr/bin/env python3
"""Build a tiny real Linux guest (kernel + initramfs) for fcq tests and demos.

Usage: python3 tools/guest/build.py [--force] OUTDIR

Produces OUTDIR/vmlinuz, OUTDIR/initrd.gz and OUTDIR/cmdline from Debian
packages: the kernel comes from the linux-image-*-cloud-amd64 .deb (fetched
with `apt-get download`), the initramfs holds busybox-static, qemu-ga with
its shared libraries, a few kernel modules and tools/guest/init.

Cached: when all outputs exist and are newer than this script and the init
file, nothing is done.  A lock file serialises concurrent builds.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

HERE = Path(__file__).resolve().parent
INIT = HERE / "init"
OUTPUTS = ("vmlinuz", "initrd.gz", "cmdline")

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Loaded at every boot, in dependency order (dependencies are added).
CORE_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "button", "evdev",
                "qemu_fw_cfg")  # qemu_fw_cfg: the seed data in /sys/firmware/qemu_fw_cfg
# Loaded by init only when a disk labelled "tmp" is present.
XFS_MODULES = ("xfs",)

# cryptomgr.notests=1 skips the boot-time crypto self-tests (~0.3 s under TCG).
CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests=1"
QEMU_GA = "/usr/sbin/qemu-ga"

# Small helper scripts placed in the initramfs (path -> content).
POWEROFF_SCRIPT = """\
#!/bin/sh
# Power off (or reboot/halt, $1) directly: PID 1 is a plain shell, not an init
# that handles signals.  Thaw /tmp and bound the final sync so a frozen
# filesystem cannot block the shutdown.
fsfreeze --unfreeze /tmp 2>/dev/null
( sync; umount /tmp 2>/dev/null; swapoff -a 2>/dev/null ) &
p=$!
i=0
while kill -0 "$p" 2>/dev/null && [ "$i" -lt 30 ]; do
    usleep 100000
    i=$((i + 1))
done
case "$1" in
    reboot) exec reboot -n -f ;;
    halt) exec halt -n -f ;;
    *) exec poweroff -n -f ;;
esac
"""
SHUTDOWN_SCRIPT = """\
#!/bin/sh
# Minimal shutdown(8) for qemu-ga guest-shutdown: shutdown -h -P|-H|-r +0 MSG
mode=poweroff
for a in "$@"; do
    case "$a" in
        -r) mode=reboot ;;
        -H) mode=halt ;;
        -P) mode=poweroff ;;
    esac
done
setsid /sbin/fcq-poweroff "$mode" </dev/null >/dev/null 2>&1 &
exit 0
"""
# busybox acpid maps the power button to /etc/acpi/PWRF/00000080.
ACPI_POWER_SCRIPT = """\
#!/bin/sh
exec /sbin/fcq-poweroff poweroff
"""
SCRIPTS: dict[str, str] = {
    "sbin/fcq-poweroff": POWEROFF_SCRIPT,
    "sbin/shutdown": SHUTDOWN_SCRIPT,
    "etc/acpi/PWRF/00000080": ACPI_POWER_SCRIPT,
}
FILES: dict[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "fcq-guest\n",
}
DIRS = ("dev", "proc", "sys", "run", "tmp", "root", "var/log", "lib/modules", "etc/acpi/PWRF")
SYMLINKS = {"var/run": "../run"}

FIXED_MTIME = 1_700_000_000  # reproducible archive timestamps


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"guest-build: {msg}", flush=True)


def run(
    argv: list[str], cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError(f"command not found: {argv[0]}") from exc
    if check and proc.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def run_bytes(argv: list[str]) -> bytes:
    try:
        proc = subprocess.run(argv, capture_output=True)
    except FileNotFoundError as exc:
        raise BuildError(f"command not found: {argv[0]}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise BuildError(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return proc.stdout


# ---------------------------------------------------------------- caching


def up_to_date(outdir: Path) -> bool:
    newest_input = max(Path(__file__).resolve().stat().st_mtime, INIT.stat().st_mtime)
    for name in OUTPUTS:
        try:
            if (outdir / name).stat().st_mtime <= newest_input:
                return False
        except FileNotFoundError:
            return False
    return True


# ---------------------------------------------------------------- kernel


def kernel_package() -> str:
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    match = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.MULTILINE)
    if not match:
        raise BuildError(f"cannot resolve {KERNEL_META_PACKAGE}:\n{out}")
    return match.group(1)


def fetch_kernel(work: Path) -> Path:
    """Download and unpack the cloud kernel package; return the unpacked root."""
    pkg = kernel_package()
    log(f"downloading {pkg}")
    dl = work / "deb"
    dl.mkdir()
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:  # _apt cannot write into our private temp dir
        argv += ["-o", "APT::Sandbox::User=root"]
    run([*argv, pkg], cwd=dl)
    debs = sorted(dl.glob("*.deb"))
    if len(debs) != 1:
        raise BuildError(f"expected one .deb in {dl}, found {debs}")
    root = work / "kernel"
    run(["dpkg", "-x", str(debs[0]), str(root)])
    return root


def find_vmlinuz(kroot: Path) -> tuple[Path, str]:
    images = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise BuildError(f"expected one vmlinuz in the kernel package, found {images}")
    return images[0], images[0].name.removeprefix("vmlinuz-")


def find_moddir(kroot: Path, version: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        cand = kroot / base / version
        if cand.is_dir():
            return cand
    raise BuildError(f"no modules directory for {version}")


# ---------------------------------------------------------------- modules

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def index_modules(moddir: Path) -> tuple[dict[str, Path], set[str]]:
    index: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        if path.name.endswith(MODULE_SUFFIXES):
            index[module_name(path)] = path
    builtin: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.exists():
        for line in builtin_file.read_text().split():
            builtin.add(module_name(Path(line)))
    return index, builtin


def module_deps(path: Path) -> tuple[list[str], list[str]]:
    """Hard dependencies and 'pre:' soft dependencies of one module file."""
    hard = run(["modinfo", "-F", "depends", str(path)]).stdout.strip()
    soft = run(["modinfo", "-F", "softdep", str(path)]).stdout
    pre: list[str] = []
    for line in soft.splitlines():
        words = line.split()
        take = False
        for word in words:
            if word.endswith(":"):
                take = word == "pre:"
            elif take:
                pre.append(word.replace("-", "_"))
    return [d.replace("-", "_") for d in hard.split(",") if d], pre


def order_modules(wanted: Iterable[str], index: dict[str, Path], builtin: set[str]) -> list[str]:
    """Module names, each after its dependencies (depth-first post-order)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, required: bool) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "busy":
            raise BuildError(f"module dependency cycle at {name}")
        if name not in index:
            if name in builtin or not required:
                return  # built into the kernel, or an optional alias (e.g. crc32c)
            raise BuildError(f"module {name} not found in the kernel package")
        state[name] = "busy"
        hard, pre = module_deps(index[name])
        for dep in hard:
            visit(dep, True)
        for dep in pre:
            visit(dep, False)
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, True)
    return order


SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(data: bytes) -> bytes:
    """Drop the appended module signature.

    Verifying it costs ~0.3 s for xfs.ko under TCG; the kernel does not
    enforce signatures (CONFIG_MODULE_SIG_FORCE unset), it only taints.
    Layout: module | signature | struct module_signature (12 bytes,
    big-endian sig_len last) | magic.
    """
    if not data.endswith(SIG_MAGIC):
        return data
    info_end = len(data) - len(SIG_MAGIC)
    sig_len = int.from_bytes(data[info_end - 4 : info_end], "big")
    end = info_end - 12 - sig_len
    if end <= 0:
        raise BuildError("malformed module signature")
    return data[:end]


def module_bytes(path: Path) -> bytes:
    """Module contents, decompressed (busybox insmod may not handle .xz/.zst)
    and without signature."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".ko.gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".ko.zst"):
        data = run_bytes(["zstd", "-dc", str(path)])
    return strip_signature(data)


# ---------------------------------------------------------------- binaries


def shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths of the libraries (and loader) ldd lists; [] if static."""
    proc = run(["ldd", str(binary)], check=False)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise BuildError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs: list[Path] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (")[0].strip()
            if target.startswith("/"):
                libs.append(Path(target))
            elif line.split()[0].startswith("linux-vdso"):
                continue
            else:
                raise BuildError(f"{binary}: unresolved library: {line}")
        elif line.startswith("/"):
            libs.append(Path(line.split(" (")[0]))
    return libs


def put(root: Path, dest: str, data: bytes, mode: int) -> None:
    """Write a file into the staging tree.

    Replaces an existing entry first: an applet symlink there points to
    /bin/busybox, and writing through it would clobber the host's busybox.
    """
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def install_file(src: Path, root: Path, dest: str, mode: int | None = None) -> None:
    # read_bytes follows symlinks: the real library lands under the ldd name
    put(root, dest, src.read_bytes(), stat.S_IMODE(src.stat().st_mode) if mode is None else mode)


def install_binary(src: Path, root: Path, dest: str) -> None:
    install_file(src, root, dest)
    for lib in shared_libraries(src):
        if not (root / str(lib).lstrip("/")).exists():
            install_file(lib, root, str(lib), 0o755)


def find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).is_file():
            return Path(cand)
    found = shutil.which("busybox")
    if not found:
        raise BuildError("busybox not found (apt-get install busybox-static)")
    return Path(found)


# ---------------------------------------------------------------- initramfs


def stage_initramfs(root: Path, moddir: Path) -> dict[str, int]:
    for d in DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, target in SYMLINKS.items():
        (root / name).symlink_to(target)

    busybox = find_busybox()
    install_binary(busybox, root, "bin/busybox")
    applets = run([str(busybox), "--list-full"]).stdout.split()
    for applet in applets:
        if "/" not in applet:
            continue  # "linuxrc"
        link = root / applet
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")

    if not Path(QEMU_GA).is_file():
        raise BuildError(f"{QEMU_GA} missing (apt-get install qemu-guest-agent)")
    install_binary(Path(QEMU_GA), root, QEMU_GA)

    index, builtin = index_modules(moddir)
    core = order_modules(CORE_MODULES, index, builtin)
    xfs = [m for m in order_modules(XFS_MODULES, index, builtin) if m not in core]
    for name in core + xfs:
        put(root, f"lib/modules/{name}.ko", module_bytes(index[name]), 0o644)
    put(root, "etc/modules.core", "".join(f"{m}.ko\n" for m in core).encode(), 0o644)
    put(root, "etc/modules.xfs", "".join(f"{m}.ko\n" for m in xfs).encode(), 0o644)
    log(f"modules: {' '.join(core)} | on demand: {' '.join(xfs)}")

    for dest, text in SCRIPTS.items():
        put(root, dest, text.encode(), 0o755)
    for dest, text in FILES.items():
        put(root, dest, text.encode(), 0o644)
    install_file(INIT, root, "init", 0o755)
    return {"modules": len(core) + len(xfs), "applets": len(applets)}


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


def cpio_entry(
    out: Writer,
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> None:
    encoded = name.encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = [ino, mode, 0, 0, nlink, FIXED_MTIME, len(data), 0, 0, *rdev, len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def walk_tree(root: Path) -> Iterator[Path]:
    """All paths below root, parents first, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_cpio(root: Path, out: Writer) -> None:
    """newc archive of root owned by root:root, plus /dev/console (no mknod needed)."""
    cpio_entry(out, 1, ".", stat.S_IFDIR | 0o755, nlink=2)  # else / is 1777
    ino = 2
    for path in walk_tree(root):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            cpio_entry(out, ino, rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            cpio_entry(out, ino, rel, stat.S_IFDIR | perm, nlink=2)
        elif stat.S_ISREG(st.st_mode):
            cpio_entry(out, ino, rel, stat.S_IFREG | perm, path.read_bytes())
        else:
            raise BuildError(f"unexpected file type: {path}")
        ino += 1
        if rel == "dev":
            cpio_entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
            ino += 1
    cpio_entry(out, ino, "TRAILER!!!", 0)


# ---------------------------------------------------------------- main


def build(outdir: Path) -> None:
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=outdir))
    try:
        kroot = fetch_kernel(work)
        vmlinuz, version = find_vmlinuz(kroot)
        moddir = find_moddir(kroot, version)
        log(f"kernel {version}")

        root = work / "root"
        root.mkdir()
        stats = stage_initramfs(root, moddir)

        staged = work / "out"
        staged.mkdir()
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        with (
            open(staged / "initrd.gz", "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        ):
            write_cpio(root, gz)
        (staged / "cmdline").write_text(CMDLINE + "\n")
        for name in OUTPUTS:
            os.replace(staged / name, outdir / name)
        sizes = ", ".join(f"{n} {(outdir / n).stat().st_size / 1e6:.1f} MB" for n in OUTPUTS[:2])
        log(
            f"done in {time.monotonic() - start:.1f}s: {sizes}, "
            f"{stats['modules']} modules, {stats['applets']} applets"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the fcq test guest kernel + initramfs.")
    parser.add_argument("outdir", type=Path, help="output directory (vmlinuz, initrd.gz, cmdline)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    outdir: Path = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)

    if not args.force and up_to_date(outdir):
        log(f"up to date: {outdir}")
        return 0
    with open(outdir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build may finish meanwhile
        if not args.force and up_to_date(outdir):
            log(f"up to date: {outdir}")
            return 0
        try:
            build(outdir)
        except (BuildError, subprocess.CalledProcessError, OSError) as exc:
            print(f"guest-build: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
