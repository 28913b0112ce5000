"""The images of indexed samples, read from the post-processed shards' tars.

Post-processing writes ``S.tar`` (kept samples: ``KEY.jpg`` / ``.png`` / ``.webp``, ``.txt``,
``.json``) beside ``embeddings/``; ``ImageStore`` finds a sample's image member by shard
stem and key (one scan of a tar's headers, then cached) and reads it with one seek.

Error handling: a missing tar or member gives None (the page then shows the URL);
a tar that cannot be read raises ``SearchDataError``.
"""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path

from search.errors import SearchDataError

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png",
               "webp": "image/webp"}


class ImageStore:
    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._members = functools.lru_cache(maxsize=64)(self._scan)

    def _scan(self, stem: str) -> dict[str, tuple[int, int, str]]:
        """key -> (offset, size, extension) of the shard's image members."""
        assert self.folder is not None
        path = self.folder / f"{stem}.tar"
        if not path.is_file():
            return {}
        try:
            with tarfile.open(path) as tar:
                return {m.name.rsplit(".", 1)[0]: (m.offset_data, m.size,
                                                    m.name.rsplit(".", 1)[1].lower())
                        for m in tar.getmembers()
                        if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_TYPES}
        except (OSError, tarfile.TarError) as exc:
            raise SearchDataError(f"cannot read {path}: {exc}") from exc

    def image(self, stem: str, key: str) -> tuple[bytes, str] | None:
        """(bytes, media type) of the sample's image, or None where it is not here."""
        if self.folder is None:
            return None
        found = self._members(stem).get(key)
        if found is None:
            return None
        offset, size, ext = found
        with open(self.folder / f"{stem}.tar", "rb") as f:
            f.seek(offset)
            return f.read(size), IMAGE_TYPES[ext]


def shards_folder(source: Path) -> Path:
    """Where the tars are: the source folder, or the one above an ``embeddings`` folder."""
    return source.parent if source.name == "embeddings" else source
