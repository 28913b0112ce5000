"""The search component's exceptions::

    SearchError
    ├── QueryError        a query that cannot be answered as asked (bad input: 400)
    └── SearchDataError   the index, its source embeddings or its shards disagree or are missing
"""

from __future__ import annotations


class SearchError(Exception):
    """Base of every error the search package raises."""


class QueryError(SearchError):
    """The query is invalid: no or several inputs, an image that does not decode, a URL
    that is not a kept sample's."""


class SearchDataError(SearchError):
    """The index, the embeddings it was built from or the shards holding its images are
    missing or disagree."""
