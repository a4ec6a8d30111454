"""The host side: one VM on this host (agent, planner), the sweep, and migration halves.

``plan`` decides, the agent acts through ``hazmat`` and ``storage``, and the
migration halves are the agent's phases for moving a running guest. Nothing
here talks to Celery; the cluster layer calls in.
"""
