"""The outcome classes: every candidate URL ends in exactly one of them.

The value of each member is the string written to shard parquet files (`status` /
`error_class`), to the stats json and to the completion report.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    INVALID_URL = "invalid_url"  # unparsable URL or a scheme other than http(s)
    DNS = "dns"  # name does not resolve, or resolution timed out
    SSRF_BLOCKED = "ssrf_blocked"  # resolves to a non-public address
    CONNECT = "connect"  # refused, reset, TLS failure
    TIMEOUT = "timeout"  # connect/read timeout, or the URL's network deadline
    #: never requested: no slot of its host (busy, or backing off after a 429/503 to
    #: another URL) within the queue bound (``--host-queue-timeout``)
    HOST_BUSY = "host_busy"
    HTTP_4XX = "http_4xx"
    HTTP_429 = "http_429"  # rate limited, still limited after the retries allowed
    HTTP_5XX = "http_5xx"
    REDIRECT_LIMIT = "redirect_limit"  # more than the allowed hops, or a loop
    #: X-Robots-Tag noai / noimageai / noindex / noimageindex / noml (the worker's
    #: --disallowed-header-directives), or tdm-reservation: 1
    OPTED_OUT = "opted_out"
    #: never requested: the robots.txt of its origin disallows it for our user-agent token
    #: (an unreachable robots.txt ends the URL in its own failure: http_5xx, timeout, ...)
    ROBOTS_DISALLOWED = "robots_disallowed"
    TOO_LARGE = "too_large"  # body (decoded) over the size cap
    TOO_SMALL = "too_small"  # body under --min-body-bytes (5120: LAION's rule; 0: none)
    #: the body's first bytes are none of the allowed image formats (its Content-Type
    #: is not looked at)
    NOT_IMAGE = "not_image"
    BOMB = "bomb"  # declared pixel count over the cap (decompression bomb)
    DECODE_ERROR = "decode_error"  # truncated or corrupt image data
    SIZE_FILTERED = "size_filtered"  # below min size or over max aspect ratio
    #: the body's hash (``--compute-hash``) differs from the one in its input row's
    #: ``--verify-hash`` column, or that cell is empty (img2dataset's "hash mismatch",
    #: counted as ``failed_to_download`` as img2dataset does)
    HASH_MISMATCH = "hash_mismatch"


#: Outcomes that img2dataset's stats json counts as `failed_to_resize`: decided on a body
#: that arrived whole (img2dataset's resizer fails to decode it, or filters it); every
#: other failure, the body never read in full, counts as `failed_to_download`.
RESIZE_FAILURES: frozenset[Outcome] = frozenset(
    {Outcome.TOO_SMALL, Outcome.NOT_IMAGE, Outcome.BOMB, Outcome.DECODE_ERROR,
     Outcome.SIZE_FILTERED}
)

#: Outcomes that may change if the URL is tried again later: the host or the network
#: failed, not the URL. The coordinator sends a URL that ended in one of them back for a
#: later attempt (``--url-retries``). Left out: ``dns`` (mostly names that no longer
#: exist, the commonest failure of old URL lists; the class does not tell them from a
#: resolver timeout), every 4xx but 429, and everything decided on the body.
TRANSIENT: frozenset[Outcome] = frozenset(
    {Outcome.TIMEOUT, Outcome.CONNECT, Outcome.HTTP_5XX, Outcome.HTTP_429, Outcome.HOST_BUSY}
)

ALL_OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
