"""The knn component's exceptions::

    KnnError
    ├── SourceError      the embeddings folder is missing, empty or inconsistent
    ├── IndexBuildError  an index cannot be chosen, built or written
    ├── IndexLoadError   an index folder cannot be read
    └── SisapError       the SISAP export cannot be made or written
"""

from __future__ import annotations


class KnnError(Exception):
    """Base of every error the knn package raises."""


class SourceError(KnnError):
    """The embeddings folder is missing, empty or inconsistent."""


class IndexBuildError(KnnError):
    """An index cannot be chosen, built or written."""


class IndexLoadError(KnnError):
    """An index folder cannot be read."""


class SisapError(KnnError):
    """The SISAP export cannot be made from this source or written to this folder."""
