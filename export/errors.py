"""Exceptions of ``pairfarm export``: one base, a subclass per place things go wrong.

::

    ExportError
    ├── SourceError     the farm folder: missing, unreadable, a tar that disagrees with
    │                   its parquet
    ├── ManifestError   the destination holds another export (layout, options, source)
    │                   or an unreadable manifest
    └── LayoutError     a layout that cannot take this source (embeddings missing, a
                        width its readers reject); a file that cannot be written
"""

from __future__ import annotations


class ExportError(Exception):
    """Base of every export error; the message is meant for the user."""


class SourceError(ExportError):
    pass


class ManifestError(ExportError):
    pass


class LayoutError(ExportError):
    pass
