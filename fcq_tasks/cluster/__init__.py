"""The cluster side: the Celery app, the tasks, the host registry, the orchestrator API.

Tasks are thin: they validate their arguments and call the host layer. The
orchestrator (``fcq_tasks.api``) enqueues work on host queues and follows it.
"""
