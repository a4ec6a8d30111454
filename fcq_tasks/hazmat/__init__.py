"""The dangerous layer: QEMU processes, QMP, the guest agent, KVM probing.

Code here kills processes and talks to sockets of running guests. It makes no
decisions: the planner decides, the agent calls in here to act.
"""
