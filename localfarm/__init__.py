"""One machine, one command: ``pairfarm up`` and ``pairfarm demo``.

The local farm is a supervisor of ordinary ``pairfarm`` processes (coordinator, workers,
post-processing) over an embedded PostgreSQL; it imports none of their code, so what it
runs is exactly what runs on a real farm.
"""
