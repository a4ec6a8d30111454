"""The orchestrator's Python API, under the name the docs promise.

The implementation lives in :mod:`fcq_tasks.cluster.api`; this module is
the stable import path for programs that drive fcq.
"""

from fcq_tasks.cluster.api import Orchestrator, remote_error

__all__ = ["Orchestrator", "remote_error"]
