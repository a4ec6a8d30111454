"""kombu's Redis transports with one fix: a worker survives losing Redis mid-task.

Measured with Celery 5.7 / kombu 5.7 and the threads pool: when Redis goes
away while a task is running (acks_late: its message is not acknowledged
yet), the worker's consumer first collects the broken connection (which
detaches the transport from it) and then closes it. Closing the channel
restores the unacknowledged messages, which needs the detached transport's
connection parameters, and raises ``AttributeError: 'NoneType' object has no
attribute 'hostname'``: not a connection error, so Celery logs
"Unrecoverable error" and the worker exits. That is how a Redis restart
"lost both workers" while migrations were running.

Nothing can be restored at that point anyway (Redis is unreachable), and
nothing needs to be: kombu wrote every delivered message to Redis's
unacknowledged index when it was delivered, and the periodic
``restore_visible`` scan puts it back in its queue once ``visibility_timeout``
has passed, exactly as after a worker crash. So the restore is skipped for a
detached channel, and the worker goes on to reconnect.

Used through ``broker_transport`` (see celeryapp): ``redis://`` and
``rediss://`` URLs get :class:`Transport` (TLS through ``broker_use_ssl``,
which celeryapp always sets for rediss://, verifying the server),
``sentinel://`` URLs :class:`SentinelTransport`; ``redis+socket://`` keeps
kombu's own, without this fix.
"""

from __future__ import annotations

from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from fcq_tasks.cluster.sentinel import MasterConnection

log = structlog.get_logger()


class QoS(kombu_redis.QoS):
    def _detached(self) -> bool:
        transport = self.channel.connection
        return transport is None or transport.client is None

    def restore_unacked(self, client: Any = None) -> Any:
        if client is None and self._detached():
            delivered = self._delivered
            log.warning("broker-restore-skipped", messages=len(delivered or ()),
                        reason="connection lost; Redis redelivers them after "
                               "visibility_timeout")
            if delivered is not None:
                delivered.clear()
            return None
        return super().restore_unacked(client)

    # The same trap at the other end of a task: a task that was running when
    # Redis went away finishes after its channel was detached, and its
    # acknowledgement (acks_late) needs the detached transport too
    # ("AttributeError: 'NoneType' object has no attribute 'client'", the
    # worker exits; seen in `make chaos` with a Redis restart during a
    # migration). The acknowledgement cannot reach Redis from this channel:
    # the message stays in the unacknowledged index and is delivered again
    # after visibility_timeout, as after a worker crash; every fcq task is
    # idempotent there (a migration half runs once per attempt, imperative
    # requests expire).
    def ack(self, delivery_tag: Any) -> None:
        if self._detached():
            log.warning("broker-ack-lost", delivery_tag=str(delivery_tag),
                        reason="connection lost; Redis redelivers the task after "
                               "visibility_timeout")
            kombu_virtual.QoS.ack(self, delivery_tag)  # local bookkeeping only
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._detached():
            log.warning("broker-reject-lost", delivery_tag=str(delivery_tag),
                        reason="connection lost; Redis redelivers the task after "
                               "visibility_timeout")
            kombu_virtual.QoS.ack(self, delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)


class Channel(kombu_redis.Channel):
    QoS = QoS


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS
    connection_class = MasterConnection  # follows a failover (cluster/sentinel.py)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str | None:
    """The ``broker_transport`` for *url*: fcq's for redis://, rediss:// and sentinel://,
    else kombu's."""
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        return f"{__name__}:Transport"
    if scheme == "sentinel":
        return f"{__name__}:SentinelTransport"
    return None  # Celery picks kombu's transport from the URL
