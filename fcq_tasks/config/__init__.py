"""Configuration: host settings, cluster settings, per-VM specs, and the rules they obey.

Everything read from a file is parsed here, once, into frozen objects that
the layers above receive explicitly. Nothing in here does I/O beyond reading
the files it is asked to read.
"""
