"""Local files replaced whole: written under a hidden temporary name beside the target
(``.NAME.tmp``) and renamed over it when complete (``os.replace``, atomic on a local
filesystem), so that neither a reader nor the rerun of a killed writer ever meets half a
file under the final name. The temporary names are the ones ``pairfarm export`` and
post-processing clean up after a kill.

Error handling: ``OSError`` propagates; each component converts it to its own error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_beside(path: Path) -> Path:
    """The temporary name of ``path``: ``.NAME.tmp`` in the same folder."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield ``temporary_beside(path)`` (its folder made); rename it to ``path`` when the
    block ends without an error; remove what is left of it in any case."""
    tmp = temporary_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
