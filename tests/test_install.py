"""make deps: an install killed half-way is finished by the next run.

Runs tools/install-deps.sh for real into a virtualenv of its own (the apt
packages are already there: the suite runs after make deps).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_install(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "tools/install-deps.sh"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "VENV": str(venv)},
                          timeout=600)


def test_install_killed_while_the_virtualenv_is_created_is_finished_by_the_next_run() -> None:
    """Killed right after `python3 -m venv` began: the next run rebuilds, exactly the lock."""
    base = Path(tempfile.mkdtemp(prefix="fcq-install-", dir="/tmp"))
    venv = base / "venv"
    try:
        proc = subprocess.Popen(["bash", "tools/install-deps.sh"], cwd=ROOT,
                                env={**os.environ, "VENV": str(venv)}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # pyvenv.cfg is venv's first file; pip arrives seconds later (ensurepip).
        deadline = time.monotonic() + 120
        while not (venv / "pyvenv.cfg").exists():
            assert proc.poll() is None, "install-deps ended before creating the virtualenv"
            assert time.monotonic() < deadline, "no virtualenv after 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (venv / ".fcq-installed").exists()

        done = run_install(venv)
        assert done.returncode == 0, done.stderr
        assert f"building {venv}" in done.stdout
        assert "qemu-system-x86 1:7.2" in done.stdout  # the system versions, printed
        digest = hashlib.sha256(b"".join(
            (ROOT / f).read_bytes() for f in ("requirements/lock.txt", "setup.cfg", "setup.py")
        )).hexdigest()
        assert (venv / ".fcq-installed").read_text().strip() == digest
        frozen = subprocess.run([str(venv / "bin/python"), "-m", "pip", "freeze", "--all",
                                 "--exclude-editable"], capture_output=True, text=True,
                                check=True).stdout.split()
        locked = [line.split(" ")[0] for line in
                  (ROOT / "requirements/lock.txt").read_text().splitlines()
                  if "==" in line and not line.startswith(("#", " "))]
        def norm(req: str) -> str:
            name, version = req.split("==")
            return f"{name.lower().replace('_', '-').replace('.', '-')}=={version}"
        assert sorted(map(norm, frozen)) == sorted(map(norm, locked))
        check = subprocess.run([str(venv / "bin/python"), "-c", "import fcq_tasks, rbd"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr

        again = run_install(venv)  # nothing left to do: no rebuild
        assert again.returncode == 0, again.stderr
        assert "building" not in again.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)
