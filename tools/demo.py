"""`make demo`: one host converging a real VM from its YAML config.

Everything lives under /tmp/fcq-demo (settings, VM configs, run files,
volumes, log); nothing touches /etc or /run. Each step runs the real `fcq`
command and shows what it printed. Interrupted or not, the demo stops the
VMs it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "build" / "guest"
BASE = Path("/tmp/fcq-demo")
FCQ = [sys.executable, "-m", "fcq_tasks", "--local"]

VM_CONFIG = """\
name: demo01
parameters:
  id: 4711
  resource_group: demo
  online: true
  kvm_host: alpha
  disk: 2          # GiB, root volume
  memory: 256      # MB
  cores: 1
  nics:
  - srv: 02-00-00-00-47-11
"""


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def fcq(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"$ fcq {' '.join(args)}", flush=True)
    env = {**os.environ, "FCQ_CONFIG": str(BASE / "host.yaml")}
    proc = subprocess.run([*FCQ, *args], env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False)
    for line in proc.stdout.splitlines():
        print(f"  {line}")
    print(f"  (exit code {proc.returncode})", flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: 'fcq {' '.join(args)}' failed")
    return proc


def write_settings() -> None:
    if BASE.exists():
        subprocess.run([*FCQ, "-q", "-c", str(BASE / "host.yaml"), "kill", "demo01"],
                       capture_output=True, check=False)
        shutil.rmtree(BASE)
    (BASE / "vm").mkdir(parents=True)
    settings = {
        "host": "alpha",
        "vm_config_dir": str(BASE / "vm"),
        "run_dir": str(BASE / "run"),
        "state_dir": str(BASE / "state"),
        "log_file": str(BASE / "fcq.log"),
        "nic_mode": "user",            # no bridges on a demo machine
        "shutdown_grace": 20,
        "direct_boot": {"kernel": str(GUEST / "vmlinuz"), "initrd": str(GUEST / "initrd.gz"),
                        "append": (GUEST / "cmdline").read_text().strip()},
    }
    (BASE / "host.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def wait_for_guest() -> None:
    for _ in range(120):
        proc = subprocess.run([*FCQ, "-q", "--json", "-c", str(BASE / "host.yaml"), "status",
                               "demo01"], capture_output=True, text=True, check=False)
        if '"guest_agent": true' in proc.stdout:
            return
        time.sleep(0.5)
    raise SystemExit("demo: the guest agent never answered")


def main() -> None:
    step("Host settings: built-in defaults, overridden by /tmp/fcq-demo/host.yaml")
    write_settings()
    print((BASE / "host.yaml").read_text())

    step("Desired state: one YAML file per VM")
    (BASE / "vm" / "demo01.cfg").write_text(VM_CONFIG)
    print(VM_CONFIG)
    fcq("config", "check", str(BASE / "vm" / "demo01.cfg"))

    step("Bad input gets a clear error naming file, field and rule; nothing changes")
    broken = BASE / "broken.cfg"
    broken.write_text(VM_CONFIG.replace("name: demo01", "name: broken")
                      .replace("memory: 256", "memory: lots"))
    fcq("config", "check", str(broken), check=False)

    step("ensure: create volumes, take locks, render the QEMU config, start")
    t0 = time.monotonic()
    fcq("ensure", "demo01")
    print(f"  (QEMU running {time.monotonic() - t0:.2f} s after the command started)")
    wait_for_guest()
    print(f"  (guest agent answering {time.monotonic() - t0:.2f} s after the command started)")
    fcq("status", "demo01")
    fcq("ls")

    step("A crash behind fcq's back: kill -9 QEMU, then the ensure sweep heals it")
    pid = int((BASE / "run" / "demo01.pid").read_text())
    print(f"$ kill -9 {pid}")
    os.kill(pid, signal.SIGKILL)
    time.sleep(2)  # PID 1 reaps orphans every ~1.5 s here
    fcq("ls")
    fcq("ensure", "--all")
    wait_for_guest()

    step("stop: ACPI power-off, wait for the guest, release the locks")
    fcq("stop", "demo01")
    fcq("ls")
    print(f"\nLog (JSON lines): {BASE / 'fcq.log'}")
    print("Rendered QEMU config and serial log: " + str(BASE / "run"))


if __name__ == "__main__":
    try:
        main()
    finally:
        subprocess.run([*FCQ, "-q", "-c", str(BASE / "host.yaml"), "kill", "demo01"],
                       capture_output=True, check=False)
