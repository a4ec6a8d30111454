"""The shipped systemd units (deploy/systemd), checked by systemd's own verifier.

systemd is not PID 1 on the test machines, so the units cannot run here;
`systemd-analyze verify` parses each one as systemd would and names every
directive it would ignore. What keeps guests alive across a worker restart
(the worker's kill mode with QEMU in scopes of its own) is tested with real
processes in tests/test_qemu_scope.py.
"""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

from fcq_tasks.cli import build_parser

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
SERVICES = ("worker", "beat", "controller", "flower", "metrics")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / f"fcq-{name}.service")
    return parser


@pytest.mark.parametrize("name", SERVICES)
def test_unit_is_clean_for_systemd_and_runs_an_fcq_service(name: str, tmp_path: Path) -> None:
    text = (UNITS / f"fcq-{name}.service").read_text()
    assert f"ExecStart=/opt/fcq/bin/fcq {name}\n" in text
    assert build_parser().parse_args([name]).command == name
    # The verifier wants the program to exist: the same unit with /bin/true.
    copy = tmp_path / f"fcq-{name}.service"
    copy.write_text(text.replace("/opt/fcq/bin/fcq", "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    service = unit(name)["Service"]
    assert service["Restart"] == "always"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Environment"].startswith("FCQ_CONFIG=/etc/fcq/")


def test_only_the_worker_runs_as_root_and_it_stops_without_its_guests() -> None:
    worker = unit("worker")["Service"]
    assert worker["User"] == "root" and worker["KillMode"] == "control-group"
    assert int(worker["TimeoutStopSec"].removesuffix("min")) >= 5  # warm shutdown
    for name in SERVICES[1:]:
        assert unit(name)["Service"]["User"] == "fcq", name
