"""Redis ACL users per role: what each part of fcq may do on the shared Redis.

One Redis password shared by every host makes root on one hypervisor a
client that can read and steal every host's queued requests, flush the
database and reconfigure the server. With the users below, a host's user
touches its own queue and its own kombu bookkeeping only; it can send to
the controller's queue (move requests, the migrations' chord callbacks),
write results, its own heartbeat and the migration rendezvous keys, and
read the other hosts' heartbeats. Its channels are the results' notices
and the task events (which it publishes; it could listen to them too:
task names, VM and host names, results, never a request's arguments). No
role may run FLUSH*, CONFIG, KEYS, DEBUG, SHUTDOWN, MONITOR,
ACL or INFO (Redis's ``@dangerous``), nor MOVE/COPY to another database
or client-side tracking. A host sends to the controller's queue with LPUSH
and nothing else (a selector): it cannot read, trim or delete it. Scripts
stay allowed (Celery's chord join runs one on the hosts): see _SCRIPTS.

Key names each role touches are listed in docs/security.md. Three choices
make the host rules possible:

* every worker keeps kombu's unacknowledged-message bookkeeping under keys
  of its own (:func:`unacked_keys`), not in the shared ``unacked`` hash;
* no priority lists (``priority_steps`` is ``[0]`` everywhere): a queue is
  one Redis list, named exactly after it;
* every queue has an exchange of its own, named after it (kombu keeps a
  binding table per exchange), so a host's worker writes its own table
  only; and a host never declares a queue: what it sends (to the
  controller) goes with ``declare=[]``, and the controller declares its
  queue itself.

:func:`acl_rule` prints one line of a Redis ACL file (``aclfile``); the
password goes in as its SHA-256, never in clear.
"""

from __future__ import annotations

import hashlib

from fcq_tasks.config.validate import NAME_RE, NAME_RULE
from fcq_tasks.errors import BadRequest

#: The roles with a Redis user of their own.
ROLES = ("host", "controller", "orchestrator", "beat", "reader")

#: Prefix of the per-worker kombu bookkeeping keys (unacked messages).
KOMBU_PREFIX = "fcq:kombu:"

#: Commands no role needs. @dangerous has FLUSH*, CONFIG, KEYS, DEBUG,
#: SHUTDOWN, MONITOR, ACL, INFO, CLIENT KILL, ...; MOVE and COPY reach other
#: databases; client-side tracking reports changes to keys one may not read.
_BASE = ["resetkeys", "resetchannels", "-@all", "+@all", "-@dangerous", "-@scripting",
         "-move", "-copy", "-client|tracking"]
#: Scripts: Celery's chord join (on the hosts), redis-py's lock (kombu's
#: mutex), beat's lock. Redis checks what a script calls against its
#: caller's rules; but a script that never ends stops Redis for everyone,
#: and SCRIPT KILL cannot stop one that wrote (docs/security.md: not closed).
_SCRIPTS = ["+eval", "+evalsha", "+script|load", "+script|exists"]
#: Channels: results' notices (Celery subscribes to what it sends, even
#: inside a worker, e.g. a chord's errback) and task events; no patterns.
_CHANNELS = ["-psubscribe", "-ssubscribe", "&celery-task-meta-*", "&/*.celeryev/*"]


def unacked_keys(owner: str) -> dict[str, str]:
    """kombu transport options: worker *owner*'s own unacked-message keys."""
    base = f"{KOMBU_PREFIX}{owner}:"
    return {"unacked_key": base + "unacked", "unacked_index_key": base + "unacked_index",
            "unacked_mutex_key": base + "unacked_mutex"}


def username(role: str, host: str | None = None) -> str:
    """The conventional user name: ``fcq-host-<host>``, ``fcq-<role>`` otherwise."""
    return f"fcq-host-{host}" if role == "host" else f"fcq-{role}"


def permissions(role: str, host: str | None = None) -> list[str]:
    """The ACL rules (without user, state and password) of *role*."""
    if role not in ROLES:
        raise BadRequest("role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    if (role == "host") != (host is not None):
        raise BadRequest("host", "a host's user needs its host name, and only a host's")
    if host is not None and not NAME_RE.match(host):
        raise BadRequest("host", f"{NAME_RULE} (got {host!r})")
    if role == "host":
        queue = f"host.{host}"
        return [*_BASE, *_SCRIPTS, *_CHANNELS,
                f"~{queue}",                          # its queue: BRPOP, and restores
                f"~{KOMBU_PREFIX}{host}:*",          # its unacked messages
                f"~_kombu.binding.{queue}",          # its queue's binding (declared at start)
                f"~_kombu.binding_permanent.{queue}",
                "%R~_kombu.binding.fcq.controller",  # routing what it sends
                "(%W~fcq.controller +lpush)",        # send only: move requests, callbacks
                "~celery-task-meta-*",               # results (Celery reads before it writes)
                "~celery-taskset-meta-*",            # a chord's join counters
                f"%W~fcq:host:{host}", "%R~fcq:host:*",  # its heartbeat; the others'
                "~fcq:mig:*"]                        # migration rendezvous
    if role == "beat":
        return [*_BASE, *_SCRIPTS, *_CHANNELS,
                "%W~host.*",                         # sweeps to every host's queue
                "~_kombu.binding.*", "~_kombu.binding_permanent.*",
                "~fcq:beat", "%R~fcq:host:*",
                "~celery-task-meta-*"]
    if role == "reader":  # Flower, fcq metrics: look, listen to events
        # Write commands are allowed, but only Flower's own keys are
        # writable: its event queue (celeryev.<uuid>) and its bindings.
        return ["resetkeys", "resetchannels", "-@all", "+@read", "+@write", "+@transaction",
                "+@connection", "+eval", "+evalsha", "+script|load", "+script|exists", "+time",
                "+@pubsub",
                "-@dangerous", "%R~*",
                "~_kombu.binding.celeryev", "~_kombu.binding_permanent.celeryev",
                "~_kombu.binding_deadlines", "~celeryev.*", f"~{KOMBU_PREFIX}flower:*",
                # Flower's inspect calls: its reply queue (workers ignore them:
                # remote control is off)
                "~_kombu.binding.reply.celery.pidbox",
                "~_kombu.binding_permanent.reply.celery.pidbox", "~*.reply.celery.pidbox",
                "&*"]
    # The orchestrator side (fcq CLI, the controller) sends to every host
    # and follows results: every key, still none of the dangerous commands.
    return [*_BASE, *_SCRIPTS, "~*", "&*"]


def acl_rule(role: str, password: str, host: str | None = None,
             user: str | None = None) -> str:
    """One ``user …`` line of a Redis ACL file for *role* (and *host*)."""
    if not password:
        raise BadRequest("password", "must not be empty")
    digest = hashlib.sha256(password.encode()).hexdigest()
    name = user or username(role, host)
    return " ".join(["user", name, "on", "resetpass", f"#{digest}",
                     *permissions(role, host)])
