"""The worker's settings: small typed objects, built and validated in ``*_from_options``.

Nothing here opens a socket or a file; the CLI builds the objects from flags and the
environment, tests build them directly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pairfarm import __version__
from pairfarm.protocol import ROBOTS_MAX_BYTES, ROBOTS_MAX_TTL_S
from worker.addresses import AddressPolicy
from worker.errors import SettingsError
from worker.robots import DEFAULT_DISALLOWED_DIRECTIVES

AGENT_TOKEN = "pairfarm"
PROJECT_URL = "https://github.com/pairfarm/pairfarm"
#: RFC 9309's product token: what a robots.txt ``User-agent:`` line names
_PRODUCT_TOKEN = re.compile(r"^[A-Za-z_-]+$")


def user_agent_for(token: str) -> str:
    """The User-Agent header: ``token`` first (robots.txt groups and ``X-Robots-Tag``
    prefixes are matched against it), pairfarm's version and URL after it."""
    about = f"+{PROJECT_URL}; image-text dataset builder; opt out with X-Robots-Tag: noai"
    if token == AGENT_TOKEN:
        return f"{token}/{__version__} ({about})"
    return f"{token} (compatible; {AGENT_TOKEN}/{__version__}; {about})"


USER_AGENT = user_agent_for(AGENT_TOKEN)

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
#: img2dataset's ``encode_format`` values
ENCODE_FORMATS = ("jpg", "png", "webp")
#: img2dataset's ``compute_hash`` values: a digest of the downloaded bytes
HASHES = ("md5", "sha256", "sha512")
#: ``pairfarm download``'s input formats (img2dataset's), each also gzip-compressed
INPUT_FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
#: img2dataset's ``output_format`` values ``pairfarm download`` writes (``worker.layouts``)
LAYOUTS = ("webdataset", "files", "parquet")
#: img2dataset's ``incremental_mode`` values ``pairfarm download`` knows
INCREMENTAL_MODES = ("incremental", "overwrite")
#: img2dataset's interpolation names (its OpenCV flags; "area" is Pillow's BOX filter)
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos",
                  "lanczos4")
#: Pillow formats we decode. No TIFF, PSD, EPS, SVG or other formats with a history of
#: parser bugs or code paths we do not need for web images.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG includes MPO (phone photos)
#: an X-Robots-Tag directive: letters, digits, '-' and '_'
_DIRECTIVE = re.compile(r"^[a-z0-9_-]+$")


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """The HTTP proxies candidate URLs go through (``worker.proxy``); None: direct.

    ``from_environment`` reads ``http_proxy`` / ``https_proxy`` / ``all_proxy`` /
    ``no_proxy``, lowercase first, then uppercase (curl's and httpx's names)."""

    http: str | None = None
    https: str | None = None
    #: hosts reached directly: comma-separated names (a name covers its subdomains,
    #: a leading dot too), ``host:port``, or ``*`` for every host
    no_proxy: str = ""

    def __post_init__(self) -> None:
        for url in (self.http, self.https):
            if url is not None:
                _check_proxy_url(url)

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ProxySettings:
        def read(name: str) -> str | None:
            return env.get(name.lower()) or env.get(name.upper()) or None

        every = read("all_proxy")
        return cls(http=read("http_proxy") or every, https=read("https_proxy") or every,
                   no_proxy=read("no_proxy") or "")

    def for_scheme(self, scheme: str) -> str | None:
        return self.https if scheme == "https" else self.http


def _check_proxy_url(url: str) -> None:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise SettingsError(f"a proxy must be an http:// URL with a host (HTTPS and SOCKS "
                            f"proxies are not supported), got "
                            f"{parts.scheme}://{parts.hostname or ''}")


@dataclass(frozen=True, kw_only=True)
class FetchSettings:
    """How candidate URLs are fetched. Times in seconds, sizes in bytes."""

    concurrency: int = 128
    per_host: int = 8
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 20.0
    dns_timeout: float = 5.0
    max_body_bytes: int = 16 * 1024 * 1024
    #: bytes of response bodies in memory at once, from their first byte until decoded
    body_memory_bytes: int = 80 * 1024 * 1024
    max_redirects: int = 5
    max_retries: int = 2
    max_retry_wait: float = 30.0
    #: longest a host's backoff window stays closed, whatever its Retry-After says
    max_retry_after: float = 60.0
    #: seconds one URL may wait, over all its hops, for a slot of its host (not counted
    #: against ``deadline``, which is network time); then ``host_busy``
    host_queue_timeout: float = 300.0
    respect_opt_out: bool = True
    #: X-Robots-Tag directives that opt a response out (``worker.robots``; empty: none)
    disallowed_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    #: whether ``tdm-reservation: 1`` opts a response out
    tdm_reservation: bool = True
    user_agent: str = USER_AGENT
    agent_token: str = AGENT_TOKEN
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    proxy: ProxySettings = field(default_factory=ProxySettings)

    def __post_init__(self) -> None:
        _positive(self, ("concurrency", "per_host", "connect_timeout", "read_timeout",
                         "deadline", "dns_timeout", "max_body_bytes", "max_retry_after",
                         "host_queue_timeout"))
        if self.body_memory_bytes < 2 * self.max_body_bytes:
            raise SettingsError(f"the body memory ({self.body_memory_bytes} bytes) must hold "
                                f"at least two bodies of the maximum size "
                                f"({self.max_body_bytes} bytes)")
        if self.max_redirects < 0 or self.max_retries < 0:
            raise SettingsError("max_redirects and max_retries must be >= 0")
        for directive in self.disallowed_directives:
            if not _DIRECTIVE.match(directive):
                raise SettingsError(f"an X-Robots-Tag directive is lowercase letters, digits, "
                                    f"'-' and '_', got {directive!r}")
        if not _PRODUCT_TOKEN.match(self.agent_token):
            raise SettingsError(f"the user-agent token must be letters, '-' and '_' "
                                f"(RFC 9309's product token), got {self.agent_token!r}")


@dataclass(frozen=True, kw_only=True)
class RobotsSettings:
    """robots.txt (RFC 9309, ``worker.robotstxt``). Times in seconds."""

    enabled: bool = True
    #: how long an answer (rules, or 4xx: allow all) is used, here and by the farm
    ttl_s: int = 86_400
    #: how long a robots.txt that answered 5xx / 429 or could not be reached keeps its
    #: origin's URLs disallowed before it is fetched again
    unreachable_ttl_s: int = 600
    #: one robots.txt fetch, redirects included
    timeout_s: float = 20.0
    #: bytes of a robots.txt kept (RFC 9309: at least 500 KiB are parsed)
    max_bytes: int = ROBOTS_MAX_BYTES
    max_redirects: int = 5
    #: answers this process keeps (least recently used dropped)
    max_origins: int = 20_000

    def __post_init__(self) -> None:
        _positive(self, ("ttl_s", "unreachable_ttl_s", "timeout_s", "max_bytes",
                         "max_origins"))
        for name in ("ttl_s", "unreachable_ttl_s"):
            if getattr(self, name) > ROBOTS_MAX_TTL_S:
                raise SettingsError(f"{name} must be at most {ROBOTS_MAX_TTL_S} s "
                                    f"(RFC 9309: 24 h), got {getattr(self, name)}")
        if self.max_bytes > ROBOTS_MAX_BYTES or self.max_redirects < 0:
            raise SettingsError(f"max_bytes must be at most {ROBOTS_MAX_BYTES} and "
                                f"max_redirects >= 0")


#: the quality an unset ``--quality`` means, per encode format
DEFAULT_QUALITY = {"jpg": 95, "webp": 95, "png": 6}


def _check_quality(encode_format: str, quality: int | None) -> None:
    """img2dataset's rule: for png the quality is the compression level, 0..9."""
    if quality is None:
        return
    if encode_format == "png" and not 0 <= quality <= 9:
        raise SettingsError("for png, quality is the zlib compression level (img2dataset's "
                            f"encode_quality): 0..9, got {quality}")
    if encode_format != "png" and not 1 <= quality <= 100:
        raise SettingsError(f"quality must be within 1..100, got {quality}")


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """How bodies become images; img2dataset's names and defaults where it has them."""

    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    encode_format: str = "jpg"
    #: img2dataset's ``encode_quality``: JPEG / WebP quality (1..100), or for PNG the zlib
    #: compression level (0..9); None: 95 for JPEG / WebP, 6 for PNG
    quality: int | None = None
    #: keep the downloaded bytes when the image is not resized and already is
    #: ``encode_format`` (no transparency, orientation or blur to apply)
    skip_reencode: bool = False
    #: an ``exif`` column (img2dataset's ``extract_exif``)
    extract_exif: bool = True
    #: the digest of the downloaded bytes written as its own column (``sha256`` is
    #: always written)
    compute_hash: str = "sha256"
    #: the input column holding the expected ``compute_hash`` digest (img2dataset's
    #: ``verify_hash``); None: not verified
    verify_hash: str | None = None
    #: the input column holding face boxes to blur (img2dataset's ``bbox_col``)
    bbox_col: str | None = None
    #: img2dataset's defaults: area averaging when shrinking, Lanczos when enlarging
    downscale_interpolation: str = "area"
    upscale_interpolation: str = "lanczos"
    #: bodies with fewer bytes end ``too_small`` (LAION's 5 KB rule; 0: img2dataset's
    #: behaviour, no floor)
    min_bytes: int = 5 * 1024
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = SAFE_FORMATS

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise SettingsError(f"resize mode must be one of {RESIZE_MODES}")
        if self.encode_format not in ENCODE_FORMATS:
            raise SettingsError(f"encode format must be one of {ENCODE_FORMATS}")
        if self.compute_hash not in HASHES:
            raise SettingsError(f"compute_hash must be one of {HASHES}, "
                                f"not {self.compute_hash!r}")
        if self.verify_hash == "" or self.bbox_col == "":
            raise SettingsError("an input column name must not be empty")
        _check_quality(self.encode_format, self.quality)
        for name in (self.downscale_interpolation, self.upscale_interpolation):
            if name not in INTERPOLATIONS:
                raise SettingsError(f"interpolation must be one of {INTERPOLATIONS}, "
                                    f"not {name!r}")
        _positive(self, ("image_size", "max_pixels", "max_aspect_ratio"))
        if self.min_bytes < 0:
            raise SettingsError(f"min_bytes must be >= 0, got {self.min_bytes}")

    @property
    def encode_quality(self) -> int:
        """The quality the encoder gets (PNG: its compression level)."""
        return DEFAULT_QUALITY[self.encode_format] if self.quality is None else self.quality


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """A batch's download pipeline: fetching, imaging, and the threads that decode."""

    fetch: FetchSettings = field(default_factory=FetchSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    decode_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: bytes of pixels the decode threads hold at once (``imaging.decode_cost``); an image
    #: that needs more on its own is refused as ``bomb``
    decode_memory_bytes: int = 224 * 1024 * 1024
    robots: RobotsSettings = field(default_factory=RobotsSettings)

    def __post_init__(self) -> None:
        _positive(self, ("decode_threads", "decode_memory_bytes"))


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    """Where ``/metrics`` is served: ``port`` None is off, 0 any free port (tests)."""

    port: int | None = None
    host: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise SettingsError(f"metrics port must be within 0..65535, got {self.port}")
        if not self.host:
            raise SettingsError("metrics host must not be empty")

    @classmethod
    def from_flag(cls, port: int, host: str) -> MetricsSettings:
        """``--metrics-port 0`` (the default) means off."""
        return cls(port=port or None, host=host)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The ``pairfarm worker`` loop around the pipeline."""

    coordinator_url: str
    token: str
    output: str
    name: str
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    max_batch: int | None = None
    #: the first wait after a lease found nothing; each further one in a row doubles, up
    #: to ``idle_poll_max_s`` (equal jitter: half fixed, half random)
    idle_poll_s: float = 10.0
    idle_poll_max_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    drain_timeout_s: float = 120.0
    exit_when_idle: bool = False
    max_batches: int | None = None
    #: exit after this many batches in a row failed on this machine (its disk, output or
    #: settings) with no batch completed in between
    stop_after_failures: int = 3
    #: lease the next batch once this many or fewer of the batch in hand's candidates are
    #: unfinished, so that its lease and first requests overlap the tail; 0: off
    lease_ahead_at: int = 256
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    def __post_init__(self) -> None:
        if not self.coordinator_url.startswith(("http://", "https://")):
            raise SettingsError("the coordinator URL must start with http:// or https://")
        if not self.token:
            raise SettingsError("a worker token is required")
        if self.lease_ahead_at < 0:
            raise SettingsError(f"lease_ahead_at must be >= 0 (0: off), "
                                f"got {self.lease_ahead_at}")
        if self.stop_after_failures < 1:
            raise SettingsError(f"stop_after_failures must be >= 1, "
                                f"got {self.stop_after_failures}")


def _positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise SettingsError(f"{name} must be > 0, got {getattr(obj, name)!r}")
