"""Redis Sentinel clients that follow a failover: fixes for redis-py 8 and Celery 5.7.

redis-py's Sentinel connection asks the sentinels for the master only in
``connect()``. A command that reconnects the same connection (its retry
after a timeout or a lost connection) goes through ``connect_check_health()``
instead, to the address the connection had: the old master, frozen or gone.
Measured here after a failover (old primary SIGSTOPped): every retry of the
orchestrator's first registry read timed out on the old master, and a
worker stored "TimeoutError" as the result of a ping that had succeeded.
:class:`MasterConnection` asks the sentinels on every (re)connect.

fcq's registry client, kombu's Sentinel channel (cluster/transport.py) and
Celery's Sentinel result backend (:class:`SentinelBackend`) all use it.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from redis.sentinel import SentinelManagedConnection


class MasterConnection(SentinelManagedConnection):
    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health, retry_socket_connect)


class SentinelBackend(CelerySentinelBackend):
    """Celery's Sentinel result backend with :class:`MasterConnection`.

    Named in the result backend setting as ``fcq_tasks.cluster.sentinel:SentinelBackend+``
    followed by the sentinel:// URL
    (Celery takes "BACKEND+URL" and imports BACKEND).
    """

    def _get_pool(self, **params: Any) -> Any:
        return super()._get_pool(  # type: ignore[misc]  # not in the stubs
            **{**params, "connection_class": MasterConnection})


def result_backend_url(url: str) -> str:
    """The result backend setting for broker *url*: sentinel:// URLs get fcq's backend."""
    if url.startswith("sentinel://"):
        return f"{__name__}:SentinelBackend+{url}"
    return url
