"""The stock Celery entry point: ``celery -A fcq_tasks worker|beat|inspect|flower|events``.

Celery looks for ``fcq_tasks.celery.app`` when told ``-A fcq_tasks``. This
module builds it from the same host settings ``fcq`` reads (``$FCQ_CONFIG``,
else /etc/fcq/host.yaml if it exists, else the built-in defaults), so both
spellings run the same worker: the host's queue only, the threads pool, the
heartbeat; beat uses fcq's sweep scheduler; Flower gets the password file of
``cluster.flower_auth_file`` (as ``fcq flower`` does) unless
``FLOWER_BASIC_AUTH`` is set already.

Imported only by Celery's command line: ``fcq`` and the Python API never
import it.
"""

from __future__ import annotations

import os

from fcq_tasks import logs
from fcq_tasks.cluster.worker import prepare_worker
from fcq_tasks.config.settings import DEFAULT_SETTINGS_FILE, load_host_settings


def _settings_file() -> str | None:
    env = os.environ.get("FCQ_CONFIG")
    if env:
        return env
    return DEFAULT_SETTINGS_FILE if os.path.exists(DEFAULT_SETTINGS_FILE) else None


def _flower_auth(path: object) -> None:
    if path is None or os.environ.get("FLOWER_BASIC_AUTH"):
        return
    from pathlib import Path
    creds = ",".join(line.strip() for line in Path(str(path)).read_text().splitlines()
                     if line.strip())
    if ":" in creds:
        os.environ["FLOWER_BASIC_AUTH"] = creds


settings = load_host_settings(_settings_file())
logs.configure(settings.log_file, settings.log_level)
app = prepare_worker(settings)
app.conf.beat_scheduler = "fcq_beat.scheduler:SweepScheduler"
app.conf.beat_max_loop_interval = 5
_flower_auth(settings.cluster.flower_auth_file)
try:
    from fcq_tasks.cli.services import make_flower_read_only, protect_flower_endpoints
    protect_flower_endpoints()
    make_flower_read_only()
except ImportError:  # Flower is not installed here: nothing to protect
    pass

__all__ = ["app"]
