"""Writing an export's files: each under a temporary name beside its target, renamed when
the whole shard is written (``Staged``), so that a kill leaves no file with a final name
that a rerun would trust. The temporary names are ``.NAME.tmp``; ``remove_leftovers``
deletes those a killed run left.

Error handling: ``OSError`` becomes ``LayoutError`` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from export.errors import LayoutError
from pairfarm.staging import TMP_SUFFIX, temporary_beside

T = TypeVar("T")
TAR_MTIME = 0  # reproducible tars, as the farm writes them


def tmp_path(path: Path) -> Path:
    return temporary_beside(path)


def guard(path: Path, func: Callable[[], T]) -> T:
    try:
        return func()
    except OSError as exc:
        raise LayoutError(f"cannot write {path}: {exc}") from exc


class Staged:
    """Files of one output shard, written under temporary names and renamed in the order
    they were staged by ``commit`` (stage the done marker last)."""

    def __init__(self) -> None:
        self._paths: list[Path] = []

    def stage(self, path: Path) -> Path:
        guard(path, lambda: path.parent.mkdir(parents=True, exist_ok=True))
        self._paths.append(path)
        return tmp_path(path)

    def commit(self) -> list[Path]:
        for path in self._paths:
            guard(path, lambda p=path: os.replace(tmp_path(p), p))  # type: ignore[misc]
        return list(self._paths)

    def abort(self) -> None:
        for path in self._paths:
            tmp_path(path).unlink(missing_ok=True)


def remove_leftovers(dest: Path) -> int:
    """Delete the temporary files a killed export left under ``dest``; their number."""
    found = [p for p in dest.rglob(f".*{TMP_SUFFIX}") if p.is_file()] if dest.is_dir() else []
    for path in found:
        path.unlink()
    return len(found)


class TarSink:
    """A webdataset tar written member by member to a staged path."""

    def __init__(self, staged: Staged, path: Path) -> None:
        self.path = path
        tmp = staged.stage(path)
        # closed by close(): the sink owns the open tar across add() calls
        self._tar = guard(path, lambda: tarfile.open(  # noqa: SIM115
            tmp, "w", format=tarfile.PAX_FORMAT))

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
        guard(self.path, lambda: self._tar.addfile(info, io.BytesIO(data)))

    def close(self) -> None:
        guard(self.path, self._tar.close)


def records_table(records: list[dict[str, Any]], order: Iterable[str] = ()) -> pa.Table:
    """A table of ``records`` with the union of their columns (``order`` first): a column
    a shard's source batch lacks is null there."""
    names = list(dict.fromkeys([*order, *(k for r in records for k in r)]))
    columns = {name: [r.get(name) for r in records] for name in names}
    return pa.table({name: _array(values) for name, values in columns.items()})


def _array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])


def write_parquet(staged: Staged, path: Path, table: pa.Table) -> None:
    tmp = staged.stage(path)
    guard(path, lambda: pq.write_table(table, tmp))


def write_npy(staged: Staged, path: Path, array: np.ndarray) -> None:
    tmp = staged.stage(path)
    with guard(path, lambda: open(tmp, "wb")) as f:
        guard(path, lambda: np.save(f, array))


def write_json(staged: Staged, path: Path, value: Any) -> None:
    tmp = staged.stage(path)
    guard(path, lambda: tmp.write_text(json.dumps(value, indent=1, sort_keys=True)))
