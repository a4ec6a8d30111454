"""`fcq worker`, `fcq beat`, `fcq controller`, `fcq flower`, `fcq metrics`: the services."""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import sys

from fcq_tasks import logs
from fcq_tasks.cluster.celeryapp import configure
from fcq_tasks.config.clustersettings import check_secret_mode
from fcq_tasks.config.settings import HostSettings
from fcq_tasks.config.validate import check_endpoint, check_name
from fcq_tasks.errors import ConfigError


def run(settings: HostSettings, args: argparse.Namespace) -> int:
    logs.configure(settings.log_file, settings.log_level, stream=sys.stderr)
    if args.command == "worker":
        from fcq_tasks.cluster.worker import run_worker
        if args.host:
            settings = dataclasses.replace(settings, host=check_name("--host", "host", args.host))
        if args.metrics_port is not None:
            # The whole endpoint rule again: a port on an address that was
            # off (0) needs the auth file as much as one set in the file.
            _, port, _ = check_endpoint("--metrics-port", "", settings.metrics_address,
                                        args.metrics_port,
                                        None if settings.metrics_auth_file is None
                                        else str(settings.metrics_auth_file))
            settings = dataclasses.replace(settings, metrics_port=port)
        run_worker(settings)
    elif args.command == "beat":
        from fcq_beat import run_beat
        run_beat(settings)
    elif args.command == "controller":
        from fcq_tasks.cluster.controller import run_controller
        run_controller(settings)
    elif args.command == "metrics":
        from fcq_tasks.cluster.clustermetrics import run_cluster_metrics
        run_cluster_metrics(settings)
    else:
        run_flower(settings, no_auth=args.no_auth)
    return 0


def protect_flower_endpoints() -> None:
    """Put Flower's /metrics and /healthcheck behind the password of the rest of Flower.

    Flower 2.2 serves both to anyone, whatever its basic auth says (its
    other pages are ``tornado.web.authenticated``). The same decorator is
    put on their handlers here, once per process; without auth (``--no-auth``,
    a demo) they stay open, as every other page then is.
    """
    import tornado.web
    from flower.views import monitor
    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "fcq_protected", False):
            wrapped = tornado.web.authenticated(handler.get)
            wrapped.fcq_protected = True  # type: ignore[attr-defined]
            handler.get = wrapped


def make_flower_read_only() -> None:
    """Refuse every write of Flower's API (403): Flower is for watching.

    Flower 2.2 has no read-only mode: its API applies and sends tasks,
    revokes them and shuts workers down, for anyone with its password.
    Every POST of its task and worker-control API is answered 403 here,
    once per process. (Hosts would refuse such a task anyway: it carries
    no grant; and their remote control is off.)
    """
    import tornado.web
    from flower.api import control, tasks

    def refuse(self: tornado.web.RequestHandler, *args: object, **kwargs: object) -> None:
        raise tornado.web.HTTPError(403, reason="fcq runs Flower read-only: use the fcq "
                                    "command, whose requests are signed")

    for module in (tasks, control):
        for handler in vars(module).values():
            if (isinstance(handler, type) and issubclass(handler, tornado.web.RequestHandler)
                    and "post" in vars(handler)):
                handler.post = refuse


def run_flower(settings: HostSettings, no_auth: bool) -> None:
    c = settings.cluster
    argv = ["flower", f"--address={c.flower_address}", f"--port={c.flower_port}",
            "--persistent=False", "--purge_offline_workers=600"]
    if not no_auth:
        if c.flower_auth_file is None:
            raise ConfigError(settings.source, "cluster.flower_auth_file",
                              "is required for Flower (a file with user:password lines); "
                              "--no-auth only for demos")
        try:
            mode = stat.S_IMODE(os.stat(c.flower_auth_file).st_mode)
            creds = ",".join(line.strip() for line in c.flower_auth_file.read_text().splitlines()
                             if line.strip())
        except OSError as err:
            raise ConfigError(str(c.flower_auth_file), "cluster.flower_auth_file",
                              f"cannot be read: {err.strerror}") from err
        check_secret_mode(c.flower_auth_file, "cluster.flower_auth_file", mode)
        if ":" not in creds:
            raise ConfigError(str(c.flower_auth_file), "cluster.flower_auth_file",
                              "must hold user:password lines")
        # Flower reads its options from the environment too; passing the
        # credentials there keeps them out of the process's command line.
        os.environ["FLOWER_BASIC_AUTH"] = creds
    protect_flower_endpoints()
    make_flower_read_only()
    app = configure(settings)
    # Its event consumer is a kombu consumer too: bookkeeping of its own,
    # as for every worker (cluster/redisacl.py).
    from fcq_tasks.cluster.redisacl import unacked_keys
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         **unacked_keys("flower")}
    app.start(argv)
