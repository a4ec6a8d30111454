"""fcq_beat: the Celery beat schedule of ensure sweeps (grows in the Cluster issue).

For now it only names what a sweep is: ``fcq ensure --all`` on each host.
"""

#: Default seconds between two ensure sweeps of one host.
DEFAULT_SWEEP_INTERVAL = 60.0
