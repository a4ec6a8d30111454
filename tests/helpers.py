"""Small waits and probes the QEMU tests share (no fakes: they read real state)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcq_tasks.errors import FcqError
from fcq_tasks.hazmat.guestagent import GuestAgent
from fcq_tasks.hazmat.qmp import QmpSession
from fcq_tasks.host.agent import VMAgent

if TYPE_CHECKING:
    from tests.conftest import Host

#: Under TCG a 256 MB test guest's agent answers ~3 s after QEMU starts
#: (measured on a 2-core machine); leave room for a loaded CI machine.
GUEST_BOOT_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    # One last look: if this thread was held up past the deadline (a long
    # garbage collection, a loaded machine), the condition may have come
    # true meanwhile, and "timed out" would then be a false report.
    value = predicate()
    if value:
        return value
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def guest_answers(agent: VMAgent) -> bool:
    try:
        with GuestAgent(str(agent.paths.ga), 2.0, agent.name) as ga:
            ga.ping()
        return True
    except FcqError:
        return False


def wait_guest(agent: VMAgent) -> None:
    wait_for(lambda: guest_answers(agent), GUEST_BOOT_TIMEOUT, f"{agent.name}'s guest agent",
             interval=0.3)


def qmp(agent: VMAgent, command: str, **args: object) -> Any:
    """A raw QMP command on fcq's own monitor (tests only: fcq itself speaks in verbs)."""
    with QmpSession(str(agent.paths.qmp), agent.settings.qmp_timeout, agent.name) as session:
        return session.execute(command, **args)


def guest_sh(agent: VMAgent, script: str, timeout: float = 30) -> str:
    """Run *script* in the guest (through its agent); its output and exit code."""
    with GuestAgent(str(agent.paths.ga), 20, agent.name) as ga:
        pid = ga.execute("guest-exec", path="/bin/sh", arg=["-c", script],
                         **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = ga.execute("guest-exec-status", pid=pid)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode()
                err = base64.b64decode(status.get("err-data", "")).decode()
                return f"{out}{err}rc={status.get('exitcode')}"
            time.sleep(0.1)
    raise AssertionError(f"guest command did not finish: {script}")


def guest_write(agent: VMAgent, char: str, timeout: float = 30) -> str:
    """The guest writes 4 KiB of *char* to the start of its root disk, bypassing its cache."""
    return guest_sh(agent, "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = root ] && "
                    "dev=/dev/${d##*/}; done; head -c 4096 /dev/zero | tr '\\0' " + char
                    + " | dd of=$dev bs=4096 count=1 oflag=direct conv=fsync 2>&1; "
                    "r=$?; echo; echo dd=$r", timeout)


def guest_disk_bytes(agent: VMAgent, serial: str) -> int:
    out = guest_sh(agent, "for d in /sys/block/vd*; do echo $(cat $d/serial) $(cat $d/size); "
                          "done")
    sizes = dict(line.split() for line in out.splitlines() if line.count(" ") == 1)
    return int(sizes[serial]) * 512


def events(host: Host) -> list[str]:
    """The event names the fcq commands of *host* logged, in order (its JSON-lines file)."""
    log = host.settings.log_file
    assert log is not None
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(str(json.loads(line)["event"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def stopped_with_volumes(host: Host, vm: str, **params: Any) -> VMAgent:
    """VM *vm* configured on *host*, started once (its volumes made) and killed again."""
    host.write_vm(vm, **params)
    agent = host.agent(vm)
    agent.start()
    agent.kill()
    return agent


# -- fcq's /metrics -----------------------------------------------------------

#: A series: its sample name and its labels.
Series = tuple[str, frozenset[tuple[str, str]]]

#: Seconds a counter may lag behind the task it counts: Celery stores a
#: task's result before ``task_postrun`` (where the worker counts) fires,
#: so a scrape right after ``.get()`` may come a moment too early.
COUNTED_TIMEOUT = 30.0


class Samples(dict[Series, float]):
    """Series → value, as one scrape read them, and the names of the families it had.

    A family is listed even without a sample (a labelled counter nothing has
    counted yet): that tells "exported, none yet" from "not exported at all".
    """

    families: frozenset[str] = frozenset()


def series(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


#: The credentials the metrics tests scrape with.
CREDS = b"prom:scrape-secret"


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    """A secret file of *text* with *mode* (0600: as fcq demands)."""
    path.write_text(text)
    path.chmod(mode)
    return path


def basic(creds: bytes) -> str:
    return "Basic " + base64.b64encode(creds).decode()


def fetch(url: str, credentials: bytes | None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if credentials is not None:
        req.add_header("Authorization", basic(credentials))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, ConnectionError):  # not listening (yet)
        return 0, ""


def scrape(port: int, credentials: bytes | None = None) -> Samples:
    """Every sample of the /metrics endpoint on *port* (the Prometheus parser reads it)."""
    from prometheus_client.parser import text_string_to_metric_families
    status, body = fetch(f"http://127.0.0.1:{port}/metrics", credentials)
    assert status == 200, status
    families = list(text_string_to_metric_families(body))
    samples = Samples({series(s.name, **s.labels): s.value
                       for family in families for s in family.samples})
    samples.families = frozenset(family.name for family in families)
    return samples


def scrape_until(port: int, expected: dict[Series, float], credentials: bytes | None = None,
                 timeout: float = COUNTED_TIMEOUT) -> Samples:
    """The first scrape in which every series of *expected* has its value (see COUNTED_TIMEOUT)."""
    def ready() -> Samples | None:
        samples = scrape(port, credentials)
        return samples if all(samples.get(k) == v for k, v in expected.items()) else None
    found: Samples = wait_for(ready, timeout, f"series {expected} on port {port}", interval=0.2)
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; the series must be in the scrape (a missing one is no zero)."""
    key = series(name, **labels)
    assert key in samples, f"no series {name}{labels} in the scrape"
    return samples[key]


def absent(samples: Samples, family: str, name: str, **labels: str) -> bool:
    """Whether series *name*{*labels*} is missing while its *family* is exported."""
    assert family in samples.families, f"no family {family} in the scrape"
    return series(name, **labels) not in samples
