"""fcq_beat: Celery beat sending ensure sweeps to every live host, exactly once.

``fcq beat`` runs :func:`run_beat`; the schedule is built by
:class:`fcq_beat.scheduler.SweepScheduler` from the host registry.
"""

from __future__ import annotations

from fcq_tasks.cluster.celeryapp import configure
from fcq_tasks.config.settings import HostSettings


def run_beat(settings: HostSettings, loglevel: str = "INFO") -> None:
    app = configure(settings)
    app.conf.fcq_settings = settings
    app.start(["beat", "--scheduler", "fcq_beat.scheduler:SweepScheduler",
               "--loglevel", loglevel, "--max-interval", "5"])
