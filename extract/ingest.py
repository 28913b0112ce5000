"""Streaming into the database: each finished shard is handed to ``pairfarm ingest``.

The contract between extract and the coordinator is the command line, not an import: the
extract component never imports the coordinator (an extract machine needs no database
stack), and the shard is the unit of work. ``pairfarm ingest SHARD --url-col url
--caption-col caption --language-col language [extra args]`` runs in a subprocess with
this process's environment (so ``DATABASE_URL`` / ``PAIRFARM_DATA_DIR`` reach it) as soon
as the shard is
renamed into place (``--language-col language`` too, so the database's language column
is filled; the other columns land in the candidate's ``extra``), while the worker processes
go on with the next files.

Error handling: ``check_available`` raises ``IngestError`` before any work when ``pairfarm
ingest`` is missing (the coordinator extra is not installed); a non-zero exit on a shard
raises ``IngestError`` with the tail of its output. The shard stays on disk either way.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from extract.errors import IngestError

_TAIL = 2000


@dataclass(frozen=True, slots=True)
class IngestCommand:
    """``pairfarm ingest`` as argv, with the extra arguments the user passed through."""

    extra_args: tuple[str, ...] = ()
    base: tuple[str, ...] = (sys.executable, "-m", "pairfarm", "ingest")

    def argv(self, shard: Path) -> list[str]:
        return [*self.base, str(shard), "--url-col", "url", "--caption-col", "caption",
                "--language-col", "language", *self.extra_args]

    def check_available(self) -> None:
        proc = subprocess.run([*self.base, "--help"], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise IngestError(
                "--ingest needs the 'pairfarm ingest' command"
                f" (pip install 'pairfarm[coordinator]'): {_tail(proc.stderr or proc.stdout)}"
            )

    def run(self, shard: Path) -> None:
        proc = subprocess.run(self.argv(shard), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise IngestError(
                f"pairfarm ingest {shard.name} exited {proc.returncode}:"
                f" {_tail(proc.stderr or proc.stdout)}"
            )


def _tail(text: str) -> str:
    return text.strip()[-_TAIL:]
