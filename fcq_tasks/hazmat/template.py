"""Render a VM's QEMU configuration (``-readconfig`` format) from a template.

The built-in template ``qemu.cfg.j2`` sits next to this module; a host can
point ``template`` in its settings at its own. Rendering is strict: an
unknown variable or a value that could break out of its quotes is an error,
never silently empty.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import jinja2

from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.vmspec import VMSpec
from fcq_tasks.errors import ConfigError
from fcq_tasks.hazmat.qemu import VMRunPaths

#: Linux interface names are at most 15 characters (IFNAMSIZ - 1).
IFNAME_MAX = 15


@dataclass(frozen=True)
class Drive:
    """One disk as QEMU sees it: ``id`` doubles as drive id and serial."""

    id: str
    file: str
    format: str
    cache: str
    #: QEMU's werror/rerror for the drive ("" leaves QEMU's default): "stop"
    #: pauses the guest at its first failed request, e.g. once fenced.
    on_error: str = ""


@dataclass(frozen=True)
class RunPaths:
    qmp: str           # fcq's own monitor: one client at a time, fcq's
    ga: str
    observer: str = ""  # a second monitor for read-only observers (tests, metrics)
    sweep: str = ""     # a third, which the worker's sweep keeps open
    seed: str = ""      # the VM's configuration as JSON, for the guest (fw_cfg)


def run_paths(paths: VMRunPaths) -> RunPaths:
    """What a QEMU config names of a VM's run files (all of them: fcq's own QEMUs)."""
    return RunPaths(qmp=str(paths.qmp), ga=str(paths.ga), observer=str(paths.observer),
                    sweep=str(paths.sweep), seed=str(paths.seed))


def _quote(value: object) -> str:
    text = str(value)
    if '"' in text or "\n" in text or "\\" in text:
        raise ValueError(f"value {text!r} cannot be quoted in a QEMU config")
    return f'"{text}"'


def load_template(settings: HostSettings) -> tuple[str, str]:
    """(text, name) of the template this host uses."""
    if settings.template is None:
        text = resources.files("fcq_tasks.hazmat").joinpath("qemu.cfg.j2").read_text()
        return text, "<built-in qemu.cfg.j2>"
    try:
        return settings.template.read_text(), str(settings.template)
    except OSError as err:
        raise ConfigError(settings.source, "template", f"cannot be read: {err.strerror}") from err


@functools.lru_cache(maxsize=8)
def _compiled(text: str) -> jinja2.Template:
    """The template *text*, compiled once per process (~70 ms each time otherwise).

    Keyed by the text itself, so an edited template file takes effect at the
    next start.
    """
    # Not HTML: values are guarded by the "q" filter, which refuses quotes.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False,  # noqa: S701
                             keep_trailing_newline=True)
    env.filters["q"] = _quote
    return env.from_string(text)


def render_qemu_config(settings: HostSettings, spec: VMSpec, accel: str,
                       drives: list[Drive], paths: RunPaths) -> str:
    text, name = load_template(settings)
    nics = []
    for nic in spec.nics:
        ifname = f"t{nic.net}{spec.id}"
        if settings.nic_mode == "tap" and len(ifname) > IFNAME_MAX:
            raise ConfigError(spec.source, f"parameters.nics.{nic.net}",
                              f"tap name {ifname!r} is longer than {IFNAME_MAX} characters "
                              "(shorten the network name or the id)")
        nics.append({"net": nic.net, "mac": nic.mac, "ifname": ifname})
    context: dict[str, Any] = {
        "vm": spec,
        "accel": accel,
        "drives": [asdict(d) for d in drives],
        "nics": nics if settings.nic_mode != "none" else [],
        "nic_mode": settings.nic_mode,
        "paths": asdict(paths),
        "boot": None if settings.direct_boot is None else asdict(settings.direct_boot),
        "host": settings.host,
    }
    try:
        return _compiled(text).render(context)
    except (jinja2.TemplateError, ValueError) as err:
        raise ConfigError(name, "template", f"cannot be rendered for {spec.name}: {err}") from err

