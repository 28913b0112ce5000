"""``pairfarm export``: a farm's output folder to a dataset folder in a named layout.

A farm writes one shard per batch, named by batch id (``00000001``, gaps where a batch
failed); readers expect shards numbered from 0 in their own layout. ``export`` reads the
finished shards of a farm (``source``), numbers the samples it takes in its own shards
from 0 (``run``), and writes them through a layout (``layouts``: name -> writer module).
``manifest`` records what was exported, so that a later export adds only new batches.

Error handling: every error a user can cause or meet (a missing or unreadable source, a
destination holding another export, a layout that needs embeddings the source lacks, a
full disk) is an ``ExportError`` (``export.errors``) with a sentence that says which.
"""
