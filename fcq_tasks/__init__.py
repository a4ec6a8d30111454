"""fcq: QEMU VM life-cycle management across hypervisor hosts, on Celery."""

__version__ = "0.1.0"
