"""What both halves of a migration share: the VM, the rendezvous, the deadline, the hold.

A half holds the VM's operation lock for its whole run (so no ensure on its
host plans around it) and one of the host's migration slots.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from fcq_tasks.deadline import Deadline
from fcq_tasks.host.agent import VMAgent
from fcq_tasks.host.migration.rendezvous import Rendezvous
from fcq_tasks.host.migration.slots import migration_slot


class Half:
    """One half of attempt *rdv.attempt* of VM *agent.name*, talking to host *peer*."""

    action = "migrate"

    def __init__(self, agent: VMAgent, rdv: Rendezvous, peer: str, deadline: Deadline) -> None:
        self.agent = agent
        self.rdv = rdv
        self.peer = peer
        self.deadline = deadline
        self.log = agent.log.bind(action=self.action, peer=peer, attempt=rdv.attempt)
        #: Phase marks, wall-clock seconds: the result carries them so that
        #: finish_migration can tell the phases apart across the two hosts.
        self.marks: dict[str, float] = {"begin": rdv.began_at}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The VM's operation lock and a migration slot of this host, for the whole run."""
        s = self.agent.settings
        with self.agent.locked(), migration_slot(s.run_dir, s.max_migrations, self.agent.name,
                                                 s.host):
            yield

    def abort(self, err: BaseException) -> None:
        """Tell the peer at once, rather than let it find out by our silence."""
        self.rdv.abort(str(err) or type(err).__name__)
