"""What the shard records of a body besides its image: hashes and EXIF, as img2dataset.

- ``digest(body, name)``: the hex digest of the *downloaded* bytes (img2dataset's
  ``compute_hash``: ``md5``, ``sha256`` or ``sha512`` of the original body, never of the
  re-encoded image).
- ``verify(body, name, expected)``: img2dataset's ``verify_hash``: the body's digest must
  equal the input row's (hex, case ignored); a different or missing one raises
  ``ImageRejected(HASH_MISMATCH)``.
- ``exif_json(body)``: img2dataset's ``extract_exif``: ``exifread.process_file(...,
  details=False)``, every tag as ``str(value).strip()``, as a JSON object string (``{}``
  when the body has no EXIF); None when exifread cannot read it.

All blocking: called in the decode thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

from pairfarm.outcomes import Outcome
from worker.errors import ImageRejected

# exifread logs every malformed tag at WARNING; img2dataset silences it the same way
logging.getLogger("exifread").setLevel(logging.CRITICAL)


def digest(body: bytes, name: str) -> str:
    return hashlib.new(name, body).hexdigest()


def verify(body: bytes, name: str, expected: object) -> None:
    """Raise ``ImageRejected(HASH_MISMATCH)`` unless ``body``'s ``name`` digest is
    ``expected``."""
    if not isinstance(expected, str) or not expected.strip():
        raise ImageRejected(Outcome.HASH_MISMATCH, f"no expected {name} in the input row")
    actual = digest(body, name)
    if actual != expected.strip().lower():
        raise ImageRejected(Outcome.HASH_MISMATCH,
                            f"{name} {actual} != expected {expected.strip()[:128]}")


def exif_json(body: bytes) -> str | None:
    """The EXIF tags of ``body`` as img2dataset writes them (``{}``: none), or None when
    exifread fails on it."""
    import exifread

    try:
        tags = exifread.process_file(io.BytesIO(body), details=False)
    except Exception:  # a third-party parser of untrusted bytes; img2dataset does the same
        return None
    return json.dumps({key: str(value).strip() for key, value in tags.items()
                       if value is not None})
